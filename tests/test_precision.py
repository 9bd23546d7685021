"""dtype=bfloat16: GPU-only; on the CPU one clear line and exit 2, before anything is written."""
from scratchlm.cli import main
from scratchlm.datasets import dataset_path


def test_bfloat16_on_the_cpu_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--corpus", str(dataset_path("names.txt")), "--tokenizer", "char", "--preset", "nano-cpu",
                   "--set", "dtype=bfloat16", "--iters", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["scratchlm: error: bfloat16 is GPU-only; CPU trains in float32 (drop --set dtype=bfloat16, "
                   "or train on a GPU with --backend cupy)"]
    assert not out.exists()


def test_float32_is_the_default_and_other_dtypes_are_refused(tmp_path, capsys):
    from scratchlm.config import TrainConfig
    assert TrainConfig().dtype == "float32"
    status = main(["train", "--corpus", str(dataset_path("names.txt")), "--set", "dtype=float16",
                   "--out", str(tmp_path / "run")])
    assert status == 2
    assert "config key dtype must be 'float32' or 'bfloat16', got 'float16'" in capsys.readouterr().err
