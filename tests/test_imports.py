"""What a process started from the checkout imports: the README's `aa-trt run` needs neither
diffusers nor transformers (the `convert` extra), `convert` asks for them by name, and the
repository's top-level kernels/ never hides an installed package called `kernels`."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes the convert extra's libraries unimportable, as on an install
# without that extra, and the run itself (the README command, one step to keep it short).
BLOCK_AND_RUN = textwrap.dedent("""
    import sys
    class NoExtra:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("diffusers", "transformers"):
                raise ImportError(f"{name} is blocked: not installed")
    sys.meta_path.insert(0, NoExtra())
    from aa_trt.cli import main
    rc = main(["run", "examples/ref.png", "examples/dance.mp4", "-o", sys.argv[1], "--steps", "1",
               "--frames", "8", "--quiet"])
    loaded = [m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers")]
    assert rc == 0 and not loaded, (rc, loaded)
""")


@pytest.mark.skipif(not (ROOT / "aa_trt/assets/default.safetensors").is_file(), reason="no embedded model")
def test_readme_run_needs_neither_diffusers_nor_transformers(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCK_AND_RUN, str(tmp_path / "x.mp4")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "x.mp4").stat().st_size > 0


def test_convert_asks_for_its_extra_in_one_line(monkeypatch):
    import importlib.util

    from aa_trt import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(extras.MissingExtra) as e:
        extras.require("convert", "convert")
    msg = str(e.value)
    assert msg == '`aa-trt convert` needs transformers: pip install "aa-trt[convert]"' and "\n" not in msg
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if not extras.missing("convert"):
        extras.require("convert", "convert")  # installed here: nothing to say


def test_an_installed_kernels_package_is_not_hidden_by_the_repository_folder(tmp_path):
    # The Hub's `kernels` (a dependency of newer transformers) stands in as a regular package on
    # sys.path *after* the repository root, as with `python -m pytest` from the checkout. Ours has
    # no __init__.py, so the regular package wins, and aa_trt.kernels is still the repository's.
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("HUB = True\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path / "site")!r}]
        import kernels
        import aa_trt.kernels.resources as ours
        assert kernels.HUB and kernels.__file__ == {str(hub / "__init__.py")!r}, kernels
        assert ours.__file__ == {str(ROOT / "kernels" / "resources.py")!r}, ours.__file__
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_checking_the_parallel_flag_imports_no_torch():
    code = ("import sys\n"
            "from aa_trt.options import PARALLEL_MODES, check_parallel_mode\n"
            "assert check_parallel_mode('window') == 'window' and 'both' in PARALLEL_MODES\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_convert_reading_the_base_asks_for_the_extra(monkeypatch, tmp_path):
    """`convert` itself reaches the check before importing either library."""
    import importlib.util

    from aa_trt import convert, extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("diffusers", "transformers") else real(name, *a))
    with pytest.raises(extras.MissingExtra, match=r"needs diffusers and transformers: pip install"):
        convert._load_base(tmp_path)
