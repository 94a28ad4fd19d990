"""The README's first command: serve the driver on a scratch data dir, walk one volume
through its life with thinloopctl, printing each command as a user would type it, then
clean everything up.

    scripts/demo.sh [--data-dir DIR]          (as root; or .venv/bin/python -m csi_driver.ops.demo)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..host.sweep import mounts_under, sweep
from .client import CsiClient, wait_for_socket

DEFAULT_DEMO_DIR = "/var/tmp/thinloop-demo"
GIB = 1 << 30


def note(text: str, err: bool = False) -> None:
    """A line for whoever reads; a reader that went away must not stop the clean-up."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def say(step: str) -> None:
    print(f"\n\033[1m==> {step}\033[0m" if sys.stdout.isatty() else f"\n==> {step}", flush=True)


def shown(argv: list[str]) -> str:
    """The command as a user can paste it: quoted, and a program of this clone's .venv/bin
    named relative to the current directory when it lies under it."""
    first = argv[0]
    if os.path.isabs(first) and first.startswith(os.getcwd() + os.sep):
        first = os.path.relpath(first)
    return "$ " + shlex.join([first, *argv[1:]])


def sh(argv: list[str]) -> None:
    print(shown(argv), flush=True)
    subprocess.run(argv, check=False)


def program(console_script: str, module: str) -> list[str]:
    """How to run one of the package's commands: its console script beside this Python
    (the .venv's bin), else this Python with -m."""
    script = Path(sys.executable).parent / console_script
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.kubelet = root / "kubelet"
        self.socket = root / "csi.sock"
        self.staging = self.kubelet / "plugins" / "thinloop.csi.io" / "staging" / "demo-vol"
        self.target = self.kubelet / "pods" / "demo-pod" / "volumes" / "demo-vol" / "mount"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CsiClient | None = None

    def start_driver(self) -> CsiClient:
        self.kubelet.mkdir(parents=True, exist_ok=True)
        argv = [*program("thinloop-csi", "csi_driver"), "--endpoint", f"unix://{self.socket}",
                "--data-dir", str(self.data_dir), "--kubelet-dir", str(self.kubelet),
                "--node-id", "demo-node", "--log-level", "warning"]
        print(shown(argv) + " &", flush=True)
        self.proc = subprocess.Popen(argv)
        wait_for_socket(str(self.socket))
        self.client = CsiClient.connect(f"unix://{self.socket}")
        return self.client

    def ctl(self, *args: str) -> None:
        """Run one thinloopctl command against the demo's driver, showing it as typed."""
        argv = [*program("thinloopctl", "csi_driver.ops.ctl"), "--endpoint", f"unix://{self.socket}", *args]
        print(shown(argv), flush=True)
        res = subprocess.run(argv, check=False)
        if res.returncode != 0:
            raise SystemExit(f"thinloopctl {args[0]} failed (exit {res.returncode})")

    def stop_driver(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.send_signal(signal.SIGTERM)
            note(f"driver exited with {proc.wait(timeout=60)}")

    def run(self) -> None:
        print("Each $ line is a command you can paste into another shell while the demo runs "
              "(after it, the driver and its scratch dir are gone).")
        say("start the driver")
        self.start_driver()
        self.ctl("info")

        say("CreateVolume: 1 GiB, thin, ext4")
        vol = "demo-vol"  # the name is the volume id
        self.ctl("create", vol, "--size", "1Gi", "--fs-type", "ext4", "--param", "diskformat=thin")

        say("NodeStageVolume + NodePublishVolume")
        self.ctl("stage", vol, str(self.staging), "--fs-type", "ext4")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.ctl("publish", vol, str(self.staging), str(self.target), "--fs-type", "ext4")
        sh(["findmnt", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS", str(self.target)])

        say("write a file through the published path")
        payload = os.urandom(64 << 20)
        with open(self.target / "hello.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        (self.target / "hello.txt").write_text("hello from thinloop\n")
        print("wrote hello.txt and 64 MiB of random bytes")
        sh(["df", "-h", str(self.target)])

        say("the image is thin: apparent size vs what it really allocates")
        image = self.data_dir / "volumes" / vol / "disk.img"
        st = os.stat(image)
        print(f"{image}\n  apparent size: {st.st_size / GIB:.2f} GiB\n"
              f"  allocated:     {st.st_blocks * 512 / (1 << 20):.1f} MiB")
        sh(["du", "-h", "--apparent-size", str(image)])
        sh(["du", "-h", str(image)])

        say("NodeGetVolumeStats")
        self.ctl("stats", vol, str(self.target))

        say("unpublish, restart the driver, publish again")
        self.ctl("unpublish", vol, str(self.target))
        self.stop_driver()
        self.start_driver()
        self.ctl("publish", vol, str(self.staging), str(self.target), "--fs-type", "ext4")
        text = (self.target / "hello.txt").read_text()
        same = (self.target / "hello.bin").read_bytes() == payload
        print(f"read back: {text.strip()!r}; 64 MiB payload identical: {same}")
        if not same or text != "hello from thinloop\n":
            raise SystemExit("data did not survive the restart")

        say("clean up: unpublish, unstage, delete")
        self.ctl("unpublish", vol, str(self.target))
        self.ctl("unstage", vol, str(self.staging))
        self.ctl("delete", vol)
        self.ctl("list")

    def teardown(self) -> None:
        """Whatever happened above (a failure, Ctrl-C, a reader that closed our output),
        leave no mount, loop device or file behind."""
        try:
            self.stop_driver()
        finally:
            left = sweep(self.root)
            if left:
                note(f"teardown: removed what the demo left: {', '.join(left)}")
            if mounts_under(self.root):
                note(f"teardown: {self.root} still has mounts; left in place", err=True)
            else:
                shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thinloop-demo", description=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data-dir", default=DEFAULT_DEMO_DIR,
                   help=f"scratch directory for the demo (default {DEFAULT_DEMO_DIR}); removed at the end")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("thinloop-demo: needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    root = Path(args.data_dir)
    if root.exists() and any(root.iterdir()):
        root = Path(tempfile.mkdtemp(prefix="thinloop-demo-", dir=root.parent))
    demo = Demo(root)
    started = time.monotonic()
    try:
        try:
            demo.run()
        finally:
            demo.teardown()
    except BrokenPipeError:
        note("thinloop-demo: its output was closed; stopped and cleaned up", err=True)
        return 1
    except KeyboardInterrupt:
        note("thinloop-demo: interrupted; stopped and cleaned up", err=True)
        return 130
    note(f"\ndemo finished in {time.monotonic() - started:.1f}s; nothing left behind in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
