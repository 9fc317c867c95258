"""The body of scripts/demo: run plugin-runner as cryptsetup would.

Runs inside a private mount namespace (see scripts/demo).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
FIFO_DIR = "/lib/cryptsetup"
FIFO = FIFO_DIR + "/passfifo"
PASSPHRASE = os.environ.get("DEMO_PASSPHRASE", "correct horse battery staple")


def install_tree(root: str) -> str:
    """Lay out <root>/lib/mandos as the initramfs has it; return its path."""
    libdir = os.path.join(root, "lib", "mandos")
    plugins = os.path.join(libdir, "plugins.d")
    os.makedirs(plugins)
    for package in ("plugin_runner", "mandos"):
        os.symlink(os.path.join(REPO, package), os.path.join(libdir, package))
    shutil.copy(os.path.join(REPO, "bin", "plugin-runner"), libdir)
    for plugin in ("askpass-fifo", "password-prompt"):
        shutil.copy(os.path.join(REPO, "plugins.d", plugin), plugins)
    # As packaged: askpass-fifo needs root to create the FIFO.
    os.chmod(os.path.join(plugins, "askpass-fifo"), 0o4755)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    os.chmod(root, 0o755)
    return libdir


def main() -> int:
    created = not os.path.isdir(FIFO_DIR)
    os.makedirs(FIFO_DIR, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", FIFO_DIR],
                   check=True)
    root = tempfile.mkdtemp(prefix="mandos-demo-")
    try:
        libdir = install_tree(root)
        env = dict(os.environ, CRYPTTAB_NAME="demo_crypt",
                   CRYPTTAB_SOURCE="/dev/disk/by-uuid/demo")
        started = time.monotonic()
        runner = subprocess.Popen(
            [os.path.join(libdir, "plugin-runner"), "",
             "--plugin-dir", os.path.join(libdir, "plugins.d"),
             "--config-file", os.path.join(root, "no-such-file")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        while not os.path.exists(FIFO):
            if runner.poll() is not None:
                break
            time.sleep(0.01)
        else:
            print(f"demo: askpass-fifo is waiting on {FIFO}; "
                  "writing the passphrase into it", file=sys.stderr)
            with open(FIFO, "wb") as fifo:
                fifo.write(PASSPHRASE.encode())
        output, _ = runner.communicate(timeout=30)
        elapsed = time.monotonic() - started
        if runner.returncode != 0 or not output:
            print(f"demo: plugin-runner failed (exit status {runner.returncode})",
                  file=sys.stderr)
            return 1
        print(f"demo: plugin-runner exited {runner.returncode} after {elapsed:.3f} s; "
              "passphrase for cryptsetup:", file=sys.stderr)
        sys.stdout.buffer.write(output + b"\n")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["umount", FIFO_DIR], check=False)
        if created:
            os.rmdir(FIFO_DIR)


if __name__ == "__main__":
    sys.exit(main())
