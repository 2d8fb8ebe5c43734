"""`barlow export`: a model folder people can load elsewhere (weights, config.json, a model card, ONNX)."""
