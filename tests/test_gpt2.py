"""MODEL_TYPE=gpt2: loading offline from a folder, its tokenizer, full fine-tuning, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint_format as fmt
from lmtrain.config import TrainingConfig
from lmtrain.errors import UserError
from lmtrain.models.gpt2 import gpt2_tokenizer, load_gpt2
from tests.conftest import run_entrypoint, save_tiny_gpt2


def gpt2_settings(model_dir: Path, **over) -> TrainingConfig:
    return TrainingConfig.from_flat(model_type="gpt2", gpt2_model_name=str(model_dir),
                          tokenization_method="gpt2", block_size=32, **over)


def tokenizer_of(cfg: TrainingConfig):
    return gpt2_tokenizer(cfg.model, cfg.data)


def write_genuine_bpe_files(folder: Path) -> None:
    from lmtrain.data.tokenizers import gpt2_file

    (folder / "vocab.json").write_bytes(gpt2_file("encoder.json"))
    (folder / "merges.txt").write_bytes(gpt2_file("vocab.bpe"))


@pytest.mark.integration
def test_full_finetune_trains_every_weight(train_run, tiny_gpt2_dir, qa_corpus):
    from transformers import GPT2LMHeadModel

    summary = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                        training_data_source=str(qa_corpus), training_steps=4,
                        checkpoint_interval=4)
    ckpt = torch.load(summary.checkpoint_dir / "step_0000004.pt", weights_only=True)
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).state_dict()
    saved = ckpt[fmt.MODEL_STATE_KEY]
    assert saved.keys() == base.keys()
    assert all(not torch.equal(base[k], saved[k]) for k in base)
    assert fmt.LORA_BASE_KEY not in ckpt
    assert ckpt[fmt.HYPERPARAMETERS_KEY]["learning_rate"] == 5e-5  # the fine-tuning default
    n = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).parameters())
    assert f"parameters: {n:,} trainable / {n:,} total" in summary.log_file.read_text()
    assert summary.sample.startswith("QUESTION: ")
    assert summary.final_losses["train"] < 11.0  # ln(50257) = 10.82 is where it starts


@pytest.mark.unit
def test_load_gpt2_uses_sdpa_fp32_and_run_dropout(tiny_gpt2_dir):
    model = load_gpt2(gpt2_settings(tiny_gpt2_dir, dropout=0.2).model, 50257)
    assert model.config._attn_implementation == "sdpa"
    assert {model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop} == {0.2}
    assert model.transformer.drop.p == 0.2
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.use_cache is False


@pytest.mark.unit
def test_folder_with_genuine_files_uses_shipped_tokenizer(tmp_path, tiny_gpt2_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    write_genuine_bpe_files(folder)
    assert tokenizer_of(gpt2_settings(folder)).kind == "gpt2"
    assert tokenizer_of(gpt2_settings(tiny_gpt2_dir)).kind == "gpt2"  # no files: shipped


@pytest.mark.integration
def test_folder_with_its_own_bpe_trains_and_resumes(tmp_path, train_run, qa_corpus):
    from lmtrain.data.tokenizers import BPETokenizer

    folder = save_tiny_gpt2(tmp_path / "model", vocab_size=300)
    own = BPETokenizer.train([qa_corpus.read_text()], 300)
    own.tok.model.save(str(folder))  # vocab.json + merges.txt
    tokenizer = tokenizer_of(gpt2_settings(folder))
    assert tokenizer.kind == "gpt2_files" and tokenizer.vocab_size == 300
    text = "QUESTION: Who wrote Hamlet?"
    assert tokenizer.encode(text) == own.encode(text)
    first = train_run(model_type="gpt2", gpt2_model_name=str(folder), use_lora=True,
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2)
    assert "gpt2_files tokenizer (300 tokens)" in first.log_file.read_text()
    resumed = train_run(checkpoint_path=str(first.checkpoint_dir / "step_0000002.pt"),
                        resume_steps=1)
    assert resumed.end_step == 3


@pytest.mark.unit
def test_tokenizer_must_match_the_model_vocabulary(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "model", vocab_size=300)  # no files: shipped 50,257
    with pytest.raises(UserError, match=r"300 token embeddings .* 50257 tokens"):
        tokenizer_of(gpt2_settings(folder))


@pytest.mark.unit
def test_other_tokenization_method_is_refused(train_run, tiny_gpt2_dir, qa_corpus):
    with pytest.raises(UserError, match="TOKENIZATION_METHOD='character' does not apply"):
        train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                  tokenization_method="character", training_data_source=str(qa_corpus))


@pytest.mark.unit
def test_block_size_above_n_positions_names_block_size(train_run, tiny_gpt2_dir, qa_corpus):
    with pytest.raises(UserError, match=r"^BLOCK_SIZE=65 exceeds .* 64 positions"):
        train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir), block_size=65,
                  training_data_source=str(qa_corpus))


@pytest.mark.unit
def test_missing_folder_explains_both_ways(train_run, tmp_path, qa_corpus):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as info:
        train_run(model_type="gpt2", gpt2_model_name=str(missing),
                  training_data_source=str(qa_corpus))
    message = str(info.value)
    assert message.startswith(f"GPT2_MODEL_NAME={str(missing)!r}")
    assert "save_pretrained" in message and "ALLOW_DOWNLOAD=1" in message
    assert "\n" not in message


@pytest.mark.integration
def test_uncached_hub_id_fails_offline_with_one_line(tmp_path, qa_corpus):
    env = {"MODEL_TYPE": "gpt2", "GPT2_MODEL_NAME": "lmtrain-test/not-a-cached-model",
           "TRAINING_DATA_SOURCE": str(qa_corpus), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "LOG_DIR": str(tmp_path / "logs"),
           "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    proc = run_entrypoint(["-m", "lmtrain", "train"], env, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "GPT2_MODEL_NAME='lmtrain-test/not-a-cached-model'" in errors[0]
    assert "ALLOW_DOWNLOAD=1" in errors[0]


@pytest.mark.integration
def test_hub_id_resolves_from_the_local_cache_only(tmp_path, tiny_gpt2_dir, qa_corpus):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--lmtrain-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / commit)
    write_genuine_bpe_files(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"MODEL_TYPE": "gpt2", "USE_LORA": "1", "GPT2_MODEL_NAME": "lmtrain-test/tiny-gpt2",
           "TRAINING_DATA_SOURCE": str(qa_corpus), "HF_HOME": str(tmp_path / "hf"),
           "TEST_MODE": "1", "TRAINING_STEPS": "1", "PRECISION": "fp32", "DEVICE": "cpu",
           "LOG_DIR": str(tmp_path / "logs"), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    proc = run_entrypoint(["-m", "lmtrain", "train"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpt2 tokenizer (50257 tokens)" in proc.stdout + proc.stderr


@pytest.mark.integration
def test_resume_after_the_model_folder_moved(tmp_path, train_run, tiny_gpt2_dir, qa_corpus):
    """GPT2_MODEL_NAME may change on resume; the weights must still fit the new folder's model."""
    import shutil

    first = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2)
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_gpt2_dir, moved)
    ckpt = str(first.checkpoint_dir / "step_0000002.pt")
    resumed = train_run(checkpoint_path=ckpt, resume_steps=1, gpt2_model_name=str(moved))
    assert resumed.end_step == 3
    other = save_tiny_gpt2(tmp_path / "other", vocab_size=50257, n_embd=32)
    with pytest.raises(UserError, match=r"weights do not fit .*GPT2_MODEL_NAME="):
        train_run(checkpoint_path=ckpt, resume_steps=1, gpt2_model_name=str(other))


@pytest.mark.unit
def test_an_explicit_shape_that_differs_from_the_model_is_refused(train_run, tiny_gpt2_dir,
                                                                  qa_corpus):
    with pytest.raises(UserError) as info:
        train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir), n_layer=12,
                  n_embd=768, training_data_source=str(qa_corpus))
    message = str(info.value)
    assert message.startswith("N_LAYER=12 (from flag) does not match GPT2_MODEL_NAME=")
    assert "N_LAYER=2" in message and "\n" not in message


@pytest.mark.integration
def test_the_run_records_the_real_shape_and_context(train_run, tiny_gpt2_dir, qa_corpus,
                                                    capsys):
    from lmtrain.cli import main

    first = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir), n_embd=64,
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2)  # an explicit N_EMBD that agrees is fine
    ckpt = first.checkpoint_dir / "step_0000002.pt"
    hp = torch.load(ckpt, weights_only=True)[fmt.HYPERPARAMETERS_KEY]
    assert (hp["n_layer"], hp["n_head"], hp["n_embd"], hp["n_positions"]) == (2, 2, 64, 64)
    assert "n_layer = 2  (GPT2_MODEL_NAME)" in first.log_file.read_text()
    capsys.readouterr()
    assert main(["inspect", "--json", str(ckpt)]) == 0
    arch = json.loads(capsys.readouterr().out)["architecture"]
    assert {k: arch[k] for k in ("n_layer", "n_head", "n_embd", "n_positions")} == {
        "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}
    resumed = train_run(checkpoint_path=str(ckpt), resume_steps=1, n_layer=2)  # the true depth
    assert resumed.end_step == 3
    with pytest.raises(UserError, match=r"^N_LAYER=4 \(from flag\) does not match GPT2_MODEL"):
        train_run(checkpoint_path=str(ckpt), resume_steps=1, n_layer=4)


@pytest.mark.integration
def test_an_older_checkpoint_with_the_default_shape_resumes_with_the_true_one(
        train_run, tiny_gpt2_dir, qa_corpus, tmp_path):
    from lmtrain.checkpoint import save_checkpoint
    from lmtrain.checkpoint_format import DIGEST_KEY

    first = train_run(model_type="gpt2", gpt2_model_name=str(tiny_gpt2_dir),
                      training_data_source=str(qa_corpus), training_steps=2,
                      checkpoint_interval=2, run_name="old")
    ckpt = torch.load(first.checkpoint_dir / "step_0000002.pt", weights_only=True)
    ckpt.pop(DIGEST_KEY)
    hp = ckpt[fmt.HYPERPARAMETERS_KEY]
    del hp["n_positions"]
    hp.update(n_layer=4, n_head=4, n_embd=128)  # what older releases recorded
    old = save_checkpoint(tmp_path / "old.pt", ckpt)
    resumed = train_run(checkpoint_path=str(old), resume_steps=1, n_layer=2, n_embd=64,
                        run_name="old-resumed")
    hp = torch.load(resumed.checkpoint_dir / "step_0000003.pt", weights_only=True)[
        "hyperparameters"]
    assert (hp["n_layer"], hp["n_head"], hp["n_embd"], hp["n_positions"]) == (2, 2, 64, 64)


@pytest.mark.integration
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_gpt2_dir):
    from lmtrain.models.gpt2 import load_gpt2

    def one_step(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_gpt2(gpt2_settings(tiny_gpt2_dir, gradient_checkpointing=checkpointing).model,
                          50257)
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) \
            is checkpointing
        x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
        model(x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, recomputed = one_step(False), one_step(True)
    for name, grad in plain.items():  # dropout included: the RNG state is replayed
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_gradient_checkpointing_needs_gpt2():
    with pytest.raises(ValueError, match="GRADIENT_CHECKPOINTING=1 needs MODEL_TYPE=gpt2"):
        TrainingConfig.from_flat(gradient_checkpointing=True)


@pytest.mark.integration
def test_gradient_checkpointing_runs_a_lora_fine_tune(train_run, tiny_gpt2_dir, qa_corpus):
    summary = train_run(model_type="gpt2", use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                        gradient_checkpointing=True, training_data_source=str(qa_corpus),
                        training_steps=2, checkpoint_interval=2, learning_rate=1e-2)
    ckpt = torch.load(summary.checkpoint_dir / "step_0000002.pt", weights_only=True)
    assert any(v.abs().sum() > 0 for k, v in ckpt[fmt.MODEL_STATE_KEY].items() if "lora_B" in k)
