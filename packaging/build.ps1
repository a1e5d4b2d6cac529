# Build DICOMFuse for Windows users who don't use pip (Linux and macOS: packaging/build.sh):
#   packaging\dist\dicomfuse.exe            one self-contained executable (PyInstaller, packaging\dicomfuse.spec)
#   packaging\dist\python\*.whl, *.tar.gz   the wheel and sdist (python -m build), which the executable is built from
# Everything is made in its own venv, packaging\.build-venv (git-ignored). Safe to run again: the venv is reused,
# the outputs are replaced.
#
#   powershell -ExecutionPolicy Bypass -File packaging\build.ps1
#   then: .venv\Scripts\python -m pytest packaging      (test_binary.py, test_wheel.py)
#
# Python 3.11, always: the Windows backend uses winfspy, whose wheels (0.8.4) exist for CPython 3.10 and 3.11
# only, so the build venv is made with 'py -3.11' ($env:PYTHON overrides the interpreter; it must be 3.11).
# The executable needs WinFsp 2.x installed (https://winfsp.dev); it never contains WinFsp's DLL.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

$here = $PSScriptRoot
$root = Split-Path -Parent $here
$venv = Join-Path $here '.build-venv'
$dist = Join-Path $here 'dist'
$work = Join-Path $here 'build'
$started = Get-Date

function Invoke-Checked([string]$Exe, [string[]]$Arguments) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "failed ($LASTEXITCODE): $Exe $($Arguments -join ' ')" }
}

$vpy = Join-Path $venv 'Scripts\python.exe'
if (-not (Test-Path $vpy)) {
    Write-Host "== creating the build venv $venv"
    if ($env:PYTHON) { Invoke-Checked $env:PYTHON @('-m', 'venv', $venv) }
    else { Invoke-Checked 'py' @('-3.11', '-m', 'venv', $venv) }
}
$version = (& $vpy -c "import sys; print('%d.%d' % sys.version_info[:2])").Trim()
if ($version -ne '3.11') {
    throw "packaging\.build-venv runs Python $version; the Windows build needs 3.11 (winfspy wheels exist for " +
          "3.10 and 3.11 only). Install Python 3.11, delete packaging\.build-venv and run this again."
}
Invoke-Checked $vpy @('-m', 'pip', 'install', '-q', '--upgrade', 'pip')
Invoke-Checked $vpy @('-m', 'pip', 'install', '-q', 'pyinstaller>=6.10,<7', 'pyinstaller-hooks-contrib>=2024.8',
                      'build>=1.2', 'pipx>=1.5')

Write-Host "== wheel and sdist -> $dist\python"
$pydist = Join-Path $dist 'python'
if (Test-Path $pydist) { Remove-Item -Recurse -Force $pydist }
New-Item -ItemType Directory -Force $work | Out-Null
$log = Join-Path $work 'python-build.log'
$ErrorActionPreference = 'Continue'   # Windows PowerShell 5.1 turns a native program's stderr into errors
& $vpy -m build --outdir $pydist $root *> $log
$status = $LASTEXITCODE
$ErrorActionPreference = 'Stop'
if ($status -ne 0) { Get-Content $log -Tail 40; throw "python -m build failed ($status), see $log" }
$wheel = (Get-ChildItem $pydist -Filter 'dicomfuse-*.whl' | Select-Object -First 1).FullName
Write-Host "   $(Split-Path -Leaf $wheel)"

Write-Host '== installing the wheel into the build venv'
Invoke-Checked $vpy @('-m', 'pip', 'install', '-q', $wheel)                                 # its dependencies (winfspy)
Invoke-Checked $vpy @('-m', 'pip', 'install', '-q', '--no-deps', '--force-reinstall', $wheel) # this build's dicomfuse

Write-Host '== PyInstaller'
Invoke-Checked (Join-Path $venv 'Scripts\pyinstaller.exe') @('--noconfirm', '--clean', '--log-level', 'WARN',
    '--distpath', $dist, '--workpath', (Join-Path $work 'pyinstaller'), (Join-Path $here 'dicomfuse.spec'))
$binary = Join-Path $dist 'dicomfuse.exe'

# WinFsp's own DLL must be the one loaded (it matches the installed driver): fail if one got into the bundle.
$listing = & (Join-Path $venv 'Scripts\pyi-archive_viewer.exe') --list $binary
if ($LASTEXITCODE -ne 0) { throw "pyi-archive_viewer could not read $binary" }
$bundled = $listing | Select-String -Pattern "[\\/ '](lib)?(fuse3?|osxfuse|macfuse|fuse-t)[.-]|winfsp-"
if ($bundled) { throw "a FUSE library was bundled; the user's own WinFsp must be used:`n$($bundled -join "`n")" }

Invoke-Checked $binary @('--version')
$bytes = (Get-Item $binary).Length
$seconds = [int]((Get-Date) - $started).TotalSeconds
Write-Host "== built $binary ($([math]::Round($bytes / 1MB)) MB, $bytes bytes) in $seconds s"
