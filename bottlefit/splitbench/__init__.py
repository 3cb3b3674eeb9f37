"""Benchmarks behind ``bottlefit bench``: does splitting pay, for this model, device class and link?

``bench split`` runs three modes side by side on the same images through the split runtime's real client and
server: *local* (the whole model on the device side), *offload* (JPEG of the input to the server, the whole model
there) and *split* (head on the device, coded bottleneck, tail on the server), over emulated links
(:mod:`bottlefit.splitbench.links`), and reports them (:mod:`bottlefit.splitbench.report`).
"""
