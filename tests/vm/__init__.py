"""A QEMU (TCG) virtual machine that runs part of the test suite on a cgroup v2 kernel.

The build hosts are hybrid (controllers on cgroup v1), so the v2 driver is proven inside a
small VM: a Debian 6.1 kernel, a busybox initramfs, the host root shared read-only over 9p.
See docs/testing-vm.md. `assets` obtains and caches qemu, the kernel and busybox; `harness`
builds the initramfs, boots the VM and returns the guest's pytest status and output.
"""
