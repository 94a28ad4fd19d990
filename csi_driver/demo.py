"""The README's first command: serve the driver on a built-in default data dir and walk one
volume through its life, printing what happens, then clean everything up.

    sudo python -m csi_driver.demo [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import CsiClient, capability, wait_for_socket
from .proto import csi_pb2
from .sweep import mounts_under, sweep

DEFAULT_DEMO_DIR = "/var/tmp/thinloop-demo"
GIB = 1 << 30


def say(step: str) -> None:
    print(f"\n\033[1m==> {step}\033[0m" if sys.stdout.isatty() else f"\n==> {step}", flush=True)


def sh(argv: list[str]) -> None:
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=False)


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
        argv = [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{self.socket}",
                "--data-dir", str(self.data_dir), "--kubelet-dir", str(self.kubelet),
                "--node-id", "demo-node", "--log-level", "warning"]
        print("$ " + " ".join(argv[2:]), flush=True)
        self.proc = subprocess.Popen(argv)
        wait_for_socket(str(self.socket))
        self.client = CsiClient.connect(f"unix://{self.socket}")
        return self.client

    def stop_driver(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            print(f"driver exited with {self.proc.wait(timeout=60)}")
            self.proc = None

    def run(self) -> None:
        cap = capability(fs_type="ext4")
        say("start the driver")
        c = self.start_driver()
        info = c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        print(f"plugin {info.name} {info.vendor_version}, ready="
              f"{c.identity.Probe(csi_pb2.ProbeRequest()).ready.value}")

        say("CreateVolume: 1 GiB, thin, ext4")
        vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="demo-vol", volume_capabilities=[cap], parameters={"diskformat": "thin"},
            capacity_range=csi_pb2.CapacityRange(required_bytes=GIB))).volume
        print(f"volume {vol.volume_id}: {vol.capacity_bytes} bytes, context {dict(vol.volume_context)}")

        say("NodeStageVolume + NodePublishVolume")
        self.staging.mkdir(parents=True, exist_ok=True)
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(self.staging), volume_capability=cap))
        self.publish(c, vol.volume_id, cap)
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
        image = self.data_dir / "volumes" / vol.volume_id / "disk.img"
        st = os.stat(image)
        print(f"{image}\n  apparent size: {st.st_size / GIB:.2f} GiB\n"
              f"  allocated:     {st.st_blocks * 512 / (1 << 20):.1f} MiB")
        sh(["du", "-h", "--apparent-size", str(image)])
        sh(["du", "-h", str(image)])

        say("NodeGetVolumeStats")
        stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(self.target)))
        for u in stats.usage:
            print(f"  {csi_pb2.VolumeUsage.Unit.Name(u.unit):6} total={u.total} used={u.used} "
                  f"available={u.available}")
        print(f"  condition: {'abnormal' if stats.volume_condition.abnormal else 'healthy'}")

        say("unpublish, restart the driver, publish again")
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(self.target)))
        self.stop_driver()
        c = self.start_driver()
        self.publish(c, vol.volume_id, cap)
        text = (self.target / "hello.txt").read_text()
        same = (self.target / "hello.bin").read_bytes() == payload
        print(f"read back: {text.strip()!r}; 64 MiB payload identical: {same}")
        if not same or text != "hello from thinloop\n":
            raise SystemExit("data did not survive the restart")

        say("clean up: unpublish, unstage, delete")
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(self.target)))
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(self.staging)))
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        left = c.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
        print(f"volumes left: {[e.volume.volume_id for e in left]}")

    def publish(self, c: CsiClient, volume_id: str, cap: csi_pb2.VolumeCapability) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(self.staging),
            target_path=str(self.target), volume_capability=cap))

    def teardown(self) -> None:
        """Whatever happened above, leave no mount, loop device or file behind."""
        self.stop_driver()
        left = sweep(self.root)
        if left:
            print(f"teardown: removed what the demo left: {', '.join(left)}")
        if mounts_under(self.root):
            print(f"teardown: {self.root} still has mounts; left in place", file=sys.stderr)
            return
        shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thinloop-demo", description=__doc__.splitlines()[0])
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
        demo.run()
    finally:
        demo.teardown()
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s; nothing left behind in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
