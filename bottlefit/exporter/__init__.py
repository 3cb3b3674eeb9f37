"""Split a BottleFit model at its bottleneck, export ONNX, write the manifest."""
