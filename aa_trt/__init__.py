"""aa-trt: fast Animate Anyone (pose-guided character image-to-video), Moore weights unchanged."""
__version__ = "0.1.0"


def __getattr__(name):
    # Keep `import aa_trt` (and so `aa-trt --help`) light: torch loads on first use.
    if name == "Animator":
        from .pipeline import Animator
        return Animator
    raise AttributeError(name)


__all__ = ["Animator", "__version__"]
