"""PyTorch students and heads -> ONNX model packages the engine loads (torch side only).

    model_export.xmag_checkpoint   the official XMAG release (DINOv2 layout) -> timm ViT-B/14
    model_export.onnx_export       encoder and MIL heads -> ONNX (opset 18, dynamic batch; the
                                   int8 source with ORT's fused Attention/Gelu ops)
    model_export.quantize          fp16 (float32 IO) and int8 (dynamic / static) variants
    model_export.parity_tiles      real tiles for parity, read by the core (xmag.tiles.SlideTiles)
    model_export.parity            every variant vs PyTorch on those tiles -> parity.json
    model_export.package_writer    model.json (xmag.package.ModelCard) with sha256, atomic move
    model_export.export            the pipeline: from_training / from_xmag_release -> package
    model_export.demo              the demo recipe: distil from the test slides, then export
    model_export.cli               ``python -m model_export`` export, import-xmag, trt-bench, demo
    model_export.trt_bench         TensorRT / CUDA / CPU parity and tiles/s on a GPU machine

Imports run one way: this package uses ``training``'s model definitions (and ``demo`` its
library), ``training`` never imports this package; nothing in ``xmag/`` or ``service/`` imports
either (they need torch). Submodules are not imported here, so ``import model_export`` stays
cheap. Model input is always made by the core's ``xmag.preprocess.Preprocessor``.
"""
