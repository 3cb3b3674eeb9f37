"""Run split: the tail served over the Open Inference Protocol (KServe v2), the wire codecs, the device client and
a Triton model repository for the tail."""
