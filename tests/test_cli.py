"""The command line around training: help, sample, plot, metrics, progress and the old shim."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from lmtrain.cli import build_parser, main
from lmtrain.reporting import read_metrics
from tests.conftest import ROOT, child_env, run_entrypoint

SUBCOMMANDS = ["train", "sample", "export", "inspect", "prepare", "tokenize", "plot"]


@pytest.mark.integration
def test_help_imports_no_heavy_library():
    code = ("import sys, lmtrain.cli as c; c.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'matplotlib', 'tensorboard', "
            "'numpy') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out) > 200


@pytest.mark.unit
def test_train_help_documents_env_twin_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--training-steps TRAINING_STEPS", "env TRAINING_STEPS; default: 800",
                   "--resume CHECKPOINT_PATH", "env RESUME_STEPS", "--use-lora, --no-use-lora"):
        assert needle in text


@pytest.mark.unit
def test_resume_flags_mirror_the_env_contract():
    args = build_parser().parse_args(["train", "--resume", "x.pt", "--resume-steps", "300"])
    assert (args.checkpoint_path, args.resume_steps) == ("x.pt", "300")


@pytest.mark.integration
def test_metrics_resume_marker_plot_and_sample(train_run, capsys):
    first = train_run(training_steps=6, checkpoint_interval=3, eval_interval=3)
    second = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000006.pt"),
                       resume_steps=1)  # the newest: the same run goes on, metrics appended
    records = read_metrics(second.metrics_file)
    kinds = [(r["kind"], r["step"]) for r in records if r["kind"] in ("start", "resume")]
    assert kinds == [("start", 0), ("resume", 6)]
    train_rec = next(r for r in records if r["kind"] == "train")
    for key in ("step", "train_loss", "lr", "tokens_per_s", "grad_norm", "elapsed"):
        assert key in train_rec
    assert any(r["kind"] == "eval" and "val_loss" in r for r in records)
    assert second.plot_file is not None and second.plot_file.read_bytes()[:4] == b"\x89PNG"

    out_png = second.metrics_file.parent / "custom.png"
    assert main(["plot", str(second.metrics_file.parent), "-o", str(out_png), "--log-scale"]) == 0
    assert out_png.read_bytes()[:4] == b"\x89PNG"

    ckpt = str(second.checkpoint_dir / "step_0000007.pt")  # 6 + 1
    capsys.readouterr()
    args = ["sample", ckpt, "--prompt", "KING:", "--max-new-tokens", "12", "--seed", "3"]
    assert main([*args, "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("KING:") == 2 and "--- sample 2 ---" in out
    assert main(args) == 0
    once = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == once  # the seed makes sampling repeatable


@pytest.mark.unit
def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.integration
def test_tensorboard_metrics(train_run):
    pytest.importorskip("tensorboard")
    summary = train_run(training_steps=3, metrics="tensorboard")
    assert list(summary.metrics_file.parent.glob("events.out.tfevents.*"))


@pytest.mark.integration
def test_training_resume_shim(tmp_path, corpus):
    env = {"TRAINING_DATA_SOURCE": str(corpus), "CHECKPOINT_DIR": str(tmp_path / "c"),
           "LOG_DIR": str(tmp_path / "l"), "TEST_MODE": "1", "TRAINING_STEPS": "4",
           "CHECKPOINT_INTERVAL": "2", "RUN_NAME": "shim", "PRECISION": "fp32"}
    missing = run_entrypoint(["training_resume.py"], env, ROOT)
    assert missing.returncode == 2 and "CHECKPOINT_PATH is not set" in missing.stderr
    assert run_entrypoint(["training.py"], env, ROOT).returncode == 0
    ckpt = tmp_path / "c" / "shim" / "step_0000002.pt"
    proc = run_entrypoint(["training_resume.py"], {**env, "CHECKPOINT_PATH": str(ckpt),
                                                   "RESUME_STEPS": "1"}, ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("deprecated") == 1 and "training.py" in proc.stderr
    assert "resuming from step 2 for 1 steps (to step 3)" in proc.stdout


def _run_in_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, env=child_env(env), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.integration
def test_progress_bar_on_a_terminal_and_clean_log_files(tmp_path, corpus):
    env = {"TRAINING_DATA_SOURCE": str(corpus), "CHECKPOINT_DIR": str(tmp_path / "c"),
           "LOG_DIR": str(tmp_path / "l"), "TEST_MODE": "1", "TRAINING_STEPS": "30",
           "RUN_NAME": "tty", "PRECISION": "fp32", "LOG_INTERVAL": "10"}
    code, screen = _run_in_pty(["training.py"], env)
    assert code == 0, screen
    assert "train:" in screen and ("step/s" in screen or "s/step" in screen)
    log_text = next((tmp_path / "l" / "tty").glob("train-*.log")).read_text()
    assert "\r" not in log_text and "step 30/30" in log_text
    plain = run_entrypoint(["training.py"], {**env, "RUN_NAME": "pipe"}, ROOT)
    assert "\r" not in plain.stdout + plain.stderr and "step 10/30" in plain.stdout
    assert json.loads((tmp_path / "l" / "pipe" / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.integration
def test_a_failing_metrics_write_warns_and_training_goes_on(train_run, monkeypatch):
    from lmtrain.reporting import MetricsWriter

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    real_init = MetricsWriter.__init__

    def init_on_full_disk(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._fh.close()
        self._fh = FullDisk()

    monkeypatch.setattr(MetricsWriter, "__init__", init_on_full_disk)
    summary = train_run(training_steps=3, checkpoint_interval=3)
    assert summary.end_step == 3 and (summary.checkpoint_dir / "step_0000003.pt").is_file()
    log_text = summary.log_file.read_text()
    assert log_text.count("No space left on device") == 1 and "training goes on" in log_text


@pytest.mark.integration
def test_streamed_sample_equals_the_whole_decoded_sample(train_run, capsys):
    """Byte-level BPE tokens can split a character: streaming must print the same text."""
    import torch

    from lmtrain.generate import generate_text
    from lmtrain.inference import load_trained_model

    summary = train_run(training_steps=2, checkpoint_interval=2, tokenization_method="custom_bpe",
                        custom_vocab_size=300)
    ckpt = summary.checkpoint_dir / "step_0000002.pt"
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--prompt", "Ay, ", "--max-new-tokens", "40",
                 "--seed", "5", "--temperature", "1.5"]) == 0
    streamed = capsys.readouterr().out
    loaded = load_trained_model(ckpt)
    sampling = loaded.config.generation.model_copy(update={"max_new_tokens": 40,
                                                           "temperature": 1.5})
    whole = generate_text(loaded.model, loaded.tokenizer, "Ay, ", sampling,
                          loaded.config.model.block_size, torch.device("cpu"), seed=5)
    assert streamed == whole + "\n"


# command-line nits ---------------------------------------------------------------------------

@pytest.mark.unit
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == "lmtrain 0.1.0"


@pytest.mark.unit
def test_an_unknown_train_flag_prints_the_train_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--n-layr", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: lmtrain train")
    assert err.rstrip().endswith("unrecognized arguments: --n-layr 3 (did you mean --n-layer?)")


@pytest.mark.unit
def test_help_defaults_agree_and_show_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: None" not in text and "(default:" not in text
    assert "token-array cache [env CACHE_DIR; default: user cache]" in text
    assert "[env LR_DECAY_STEPS; default: TRAINING_STEPS, saved with the run]" in text
    assert "default: 800; MODEL_TYPE=gpt2: 500; TEST_MODE: 20; TEST_MODE gpt2: 6]" in text
    assert "[env USE_LORA; default: off]" in text


@pytest.mark.unit
def test_prepare_flags_come_from_the_settings(capsys):
    assert main(["prepare", "--train-split", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TRAIN_SPLIT='2' (from flag) is invalid")
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--tokenization-method TOKENIZATION_METHOD, --method TOKENIZATION_METHOD" in text
    assert "[env CUSTOM_VOCAB_SIZE; default: 1024; TEST_MODE: 300]" in text


@pytest.mark.integration
def test_tokenize_honours_tokenization_method(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.txt"
    data.write_text("Hello world\n", encoding="utf-8")
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "Hello world"]
    assert main(["tokenize", *common]) == 0  # the default: a character vocabulary
    assert len(json.loads(capsys.readouterr().out)) == len("Hello world")
    monkeypatch.setenv("TOKENIZATION_METHOD", "gpt2")
    assert main(["tokenize", *common]) == 0
    assert json.loads(capsys.readouterr().out) == [15496, 995]


@pytest.mark.unit
def test_tokenize_unknown_characters_advice_fits_the_command(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("hello there\n", encoding="utf-8")
    assert main(["tokenize", "--data", str(data), "--cache-dir", str(tmp_path / "c"), "h€"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TEXT holds 1 characters outside the vocabulary learned from")
    assert "'€'" in err and "DROP_UNKNOWN_CHARS" not in err and "--method" in err


@pytest.mark.integration
def test_sample_uses_the_runs_max_new_tokens(tiny_checkpoint, capsys):
    # the tiny run was trained with MAX_NEW_TOKENS=0: only the prompt comes back
    assert main(["sample", str(tiny_checkpoint), "--prompt", "AB"]) == 0
    assert capsys.readouterr().out == "AB\n"
    assert main(["sample", str(tiny_checkpoint), "--prompt", "AB", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out) == len("AB") + 5 + 1


@pytest.mark.unit
def test_checkpoint_errors_of_commands_name_their_argument(tmp_path, capsys):
    from lmtrain.errors import UserError
    from lmtrain.models.lora import check_base_reference

    assert main(["sample", str(tmp_path / "none.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: CKPT={str(tmp_path / 'none.pt')!r}")
    assert main(["export", str(tmp_path / "none.pt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: CKPT=")
    with pytest.raises(UserError, match=r"^CKPT='x.pt' is a LoRA checkpoint without"):
        check_base_reference(None, None, "CKPT='x.pt'")


@pytest.mark.unit
@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--temperature", "1e-45", "--temperature='1e-45' is invalid: input should be greater than"),
    ("--top-p", "nan", "--top-p='nan' is invalid: input should be a finite number"),
    ("--max-new-tokens", "-1", "--max-new-tokens='-1' is invalid"),
])
def test_sample_refuses_values_training_would_refuse(tiny_checkpoint, capsys, flag, value, words):
    assert main(["sample", str(tiny_checkpoint), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and err.count("\n") == 1
