"""Path model and the policy table (with property-based tests)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomfuse.core.errors import FsError
from dicomfuse.core.paths import (
    DicomPath,
    Level,
    instance_uid,
    is_gui_folder_name,
    is_side_file,
    is_uid,
    is_valid_store_id,
)
from dicomfuse.core.policy import TABLE, Deny, Op, OperationPolicy, Rule

uids = st.lists(st.integers(0, 10**12).map(str), min_size=1, max_size=6).map(".".join).filter(lambda u: len(u) <= 64)
names = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(st.lists(names.filter(lambda n: n not in (".",)), max_size=6))
def test_parse_roundtrip_and_level(parts):
    p = DicomPath.parse("/" + "/".join(parts))
    assert p.parts == tuple(parts)
    assert p.level == min(len(parts), 4)
    assert p.too_deep == (len(parts) > 4)
    if parts:
        assert p.parent.child(p.name) == p


@given(uids, uids, uids)
def test_remote_paths_of_uids(study, series, sop):
    p = DicomPath.parse(f"/store/{study}/{series}/{sop}.dcm")
    assert p.level is Level.INSTANCE and p.names_remote_object
    assert instance_uid(p.name) == sop
    assert DicomPath.parse(f"/store/{study}/{series}/{sop}.DCM").names_remote_object


@given(names.filter(lambda n: n != "."))
def test_junk_names_never_name_remote_objects(name):
    p = DicomPath.parse(f"/store/{name}")
    assert p.names_remote_object == is_uid(name)


def test_side_files():
    for name in (".DS_Store", "._x.dcm", "desktop.ini", "Thumbs.db", "x.dcm.swp", ".x.swp", "~$doc", "x~",
                 ".Trashes", ".Trash-1000", ".Spotlight-V100", ".fseventsd", "autorun.inf", "$RECYCLE.BIN",
                 "System Volume Information"):
        assert is_side_file(name), name
    for name in ("1.2.3.dcm", "scan.dcm", ".scan.dcm.XyZ123"):  # rsync temp names are uploads
        assert not is_side_file(name), name


def test_store_ids_and_gui_names():
    assert is_valid_store_id("a-b_c.1") and is_valid_store_id("x" * 256)
    assert is_valid_store_id("études_2024")  # Google allows Unicode letters and numbers
    for bad in ("", ".", "..", "a b", "x" * 257, "a/b", "a\n", "a;b", "a:b", "a\\b"):
        assert not is_valid_store_id(bad), bad
    for gui in ("untitled folder", "untitled folder 2", "New folder", "New folder (3)"):
        assert is_gui_folder_name(gui)
    assert not is_gui_folder_name("folder")


def test_table_is_complete():
    assert set(TABLE) == set(Op)
    assert all(len(row) == len(Level) for row in TABLE.values())


@given(st.sampled_from(list(Op)), st.sampled_from(list(Level)), st.booleans())
def test_policy_check_matches_table(op, level, deletion):
    rule = TABLE[op][level]
    policy = OperationPolicy(deletion_enabled=deletion)
    if isinstance(rule, Deny):
        with pytest.raises(FsError) as e:
            policy.check(op, level, "/x")
        assert e.value.errno == rule.errno
    elif rule is Rule.IF_DELETION and not deletion:
        with pytest.raises(FsError) as e:
            policy.check(op, level, "/x")
        assert e.value.errno == errno.EPERM
    else:
        policy.check(op, level, "/x")


def test_original_contract_cells():
    """The cells the original tool's README promises."""
    assert TABLE[Op.MKDIR][Level.STORE] is Rule.ALLOW  # new store at the dataset level
    for level in (Level.STUDY, Level.SERIES, Level.INSTANCE):
        assert TABLE[Op.MKDIR][level] == Deny(errno.EPERM)
    assert TABLE[Op.UNLINK][Level.INSTANCE] is Rule.IF_DELETION
    assert TABLE[Op.UPLOAD][Level.STUDY] is Rule.ALLOW  # a file dropped in a store folder
    assert TABLE[Op.UPLOAD][Level.INSTANCE] is Rule.ALLOW  # a file dropped in a series folder
    assert TABLE[Op.LINK][Level.INSTANCE] == Deny(errno.EPERM)


def test_instance_suffix_in_any_case_names_the_same_file():
    for name in ("1.2.3.DCM", "1.2.3.Dcm", "1.2.3.dcm"):
        assert DicomPath.parse(f"/s/1.2/1.2.5/{name}") == DicomPath.parse("/s/1.2/1.2.5/1.2.3.dcm")
    assert DicomPath.parse("/s/1.2/1.2.5/notes.DCM").name == "notes.DCM"  # not a UID: kept as given
    assert DicomPath.parse("/s/x.DCM").name == "x.DCM"  # a file dropped in a store folder keeps its name
