/*
 * The read-only floor of bench/floor.py, written in C against libfuse 3's high-level API: a
 * passthrough of a local folder that does nothing else, with the same kernel settings (entry,
 * attribute and negative timeouts of 1 s, keep_cache and noflush at open, READDIRPLUS with
 * attributes). It answers the question the Python floor cannot: how much of a warm re-read's cost
 * is the kernel's round trip per open, whatever language the filesystem is written in.
 *
 * Built by bench/mounts.py (CFloorMount) when gcc and libfuse3's headers are there:
 *   gcc -O2 bench/floor_c.c -o floor_c $(pkg-config --cflags --libs fuse3)
 *   ./floor_c SOURCE MOUNTPOINT -f -o fsname=dicomfuse-floor-c
 *
 * Copyright 2026 the DICOMFuse authors. Licensed under the Apache License, Version 2.0.
 */
#define FUSE_USE_VERSION 31

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char source[PATH_MAX];

static int real_path(char *out, size_t size, const char *path) {
    return snprintf(out, size, "%s%s", source, path) < (int)size ? 0 : -ENAMETOOLONG;
}

static void *floor_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    cfg->entry_timeout = 1;
    cfg->attr_timeout = 1;
    cfg->negative_timeout = 1;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO; /* READDIRPLUS for every page, as DICOMFuse asks */
    return NULL;
}

static int floor_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    char real[PATH_MAX];
    int err = real_path(real, sizeof real, path);
    (void)fi;
    if (err)
        return err;
    return lstat(real, st) ? -errno : 0;
}

static int floor_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t offset,
                         struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    char real[PATH_MAX], entry[PATH_MAX];
    struct dirent *d;
    DIR *dir;
    int err = real_path(real, sizeof real, path);
    (void)offset;
    (void)fi;
    (void)flags;
    if (err)
        return err;
    dir = opendir(real);
    if (dir == NULL)
        return -errno;
    while ((d = readdir(dir)) != NULL) {
        struct stat st;
        memset(&st, 0, sizeof st);
        if (snprintf(entry, sizeof entry, "%s/%s", real, d->d_name) < (int)sizeof entry)
            lstat(entry, &st);
        if (fill(buf, d->d_name, &st, 0, FUSE_FILL_DIR_PLUS))
            break;
    }
    closedir(dir);
    return 0;
}

static int floor_open(const char *path, struct fuse_file_info *fi) {
    char real[PATH_MAX];
    int fd, err = real_path(real, sizeof real, path);
    if (err)
        return err;
    if (fi->flags & (O_WRONLY | O_RDWR | O_TRUNC | O_APPEND))
        return -EROFS;
    fd = open(real, O_RDONLY);
    if (fd < 0)
        return -errno;
    fi->fh = (uint64_t)fd;
    fi->keep_cache = 1;
    fi->noflush = 1;
    return 0;
}

static int floor_read(const char *path, char *buf, size_t size, off_t offset, struct fuse_file_info *fi) {
    ssize_t n = pread((int)fi->fh, buf, size, offset);
    (void)path;
    return n < 0 ? -errno : (int)n;
}

static int floor_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close((int)fi->fh);
    return 0;
}

static const struct fuse_operations operations = {
    .init = floor_init,
    .getattr = floor_getattr,
    .readdir = floor_readdir,
    .open = floor_open,
    .read = floor_read,
    .release = floor_release,
};

int main(int argc, char *argv[]) {
    if (argc < 3 || realpath(argv[1], source) == NULL) {
        fprintf(stderr, "usage: %s SOURCE MOUNTPOINT [libfuse options]\n", argv[0]);
        return 2;
    }
    /* libfuse sees the arguments after SOURCE: MOUNTPOINT and its options */
    return fuse_main(argc - 1, argv + 1, &operations, NULL);
}
