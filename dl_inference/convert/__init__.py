"""Model converters: other frameworks' model files turned into ONNX for the ONNX Runtime backend."""
