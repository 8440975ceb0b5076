from .mavil import MAViL, PretrainOutput, build_model

__all__ = ["MAViL", "PretrainOutput", "build_model"]
