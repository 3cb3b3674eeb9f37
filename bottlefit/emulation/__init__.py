"""Running the boards' own binaries without the board: arm64 user-mode emulation under qemu."""
