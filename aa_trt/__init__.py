"""aa-trt: fast Animate Anyone (pose-guided character image-to-video), Moore weights unchanged.

The package is `aa_trt/` plus three top-level folders of the checkout that install as its
subpackages (pyproject's package-dir): `export/` -> aa_trt.export, `kernels/` -> aa_trt.kernels,
`training/` -> aa_trt.training. Every module imports them by those absolute names. In a plain
checkout (not installed) the finder below maps the same three names onto the folders, so
`python -c "import aa_trt.export"` works from the repository root too.
"""
__version__ = "0.1.0"

TOP_LEVEL_SUBPACKAGES = ("export", "kernels", "training")


def _map_checkout_folders() -> None:
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return  # installed from a wheel: the subpackages sit inside aa_trt/

    class CheckoutFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            pkg, _, name = fullname.partition(".")
            folder = root / name
            if pkg != __name__ or name not in TOP_LEVEL_SUBPACKAGES or not folder.is_dir():
                return None
            init = folder / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(fullname, init,
                                                              submodule_search_locations=[str(folder)])
            # kernels/ has no __init__.py on purpose (see pyproject.toml): a namespace package here
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(folder)]
            return spec

    if not any(type(f).__name__ == "CheckoutFolders" for f in sys.meta_path):
        sys.meta_path.append(CheckoutFolders())  # last: an installed mapping answers first


_map_checkout_folders()


def __getattr__(name):
    # Keep `import aa_trt` (and so `aa-trt --help`) light: torch loads on first use.
    if name == "Animator":
        from aa_trt.pipeline import Animator
        return Animator
    raise AttributeError(name)


__all__ = ["Animator", "__version__"]
