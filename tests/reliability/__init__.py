"""Reliability and security tests: crashes, recovery, reboots, full disks, races, hostile
input, path confinement, socket hygiene and a short soak. All run on real kernel objects."""
