"""Checkpoints written in the background (common/checkpoint_writer.py): complete ones hold what was staged, in the
Trainer's layout; one whose write is in progress or was interrupted never counts, for --resume or the best-model load;
the final model is the best checkpoint, its output projection still tied."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import get_last_checkpoint

from common import artifacts
from common.checkpoint_writer import CheckpointWriter
from common.models import load_model, load_tokenizer
from common.rundir import check_run_dir
from common.training import tied_parameter_names


@pytest.fixture()
def trained():
    """The smoke model after one AdamW step: a model and an optimizer with state."""
    model = load_model("smoke", load_tokenizer("smoke"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(12).reshape(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def save(writer: CheckpointWriter, run_dir: Path, step: int, model, optimizer) -> Path:
    final = run_dir / f"checkpoint-{step}"
    staging = writer.stage(final, model.state_dict(), optimizer.state_dict())
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step}))  # the caller's small files
    writer.small_files_written()
    return final


def test_a_complete_checkpoint_holds_what_was_staged(tmp_path, trained):
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    final = save(writer, tmp_path, 2, model, optimizer)
    writer.wait()
    assert {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"} <= {p.name for p in final.iterdir()}
    weights = load_file(final / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name not in tied_parameter_names(model):
            assert torch.equal(weights[name], tensor), name
    assert set(tied_parameter_names(model)).isdisjoint(weights)  # the tied projection is stored once
    saved = torch.load(final / "optimizer.pt", weights_only=True)
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(saved["state"][index]["exp_avg"], state["exp_avg"])
    assert writer.write_seconds and writer.write_seconds[0] > 0
    assert not any(p.name.startswith("tmp-") for p in tmp_path.iterdir())


def test_a_write_in_progress_does_not_count(tmp_path, trained):
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    final = tmp_path / "checkpoint-4"
    writer.stage(final, model.state_dict(), optimizer.state_dict())  # the small files not yet written
    time.sleep(0.2)
    assert not final.exists() and artifacts.checkpoints(tmp_path) == []
    writer.small_files_written()
    writer.wait()
    assert artifacts.checkpoints(tmp_path) == [final]


def test_an_interrupted_write_is_never_resumed_from(tmp_path, trained, monkeypatch):
    model, optimizer = trained
    (tmp_path / artifacts.CONFIG).write_text("{}")  # an unfinished run: a config, no final status
    writer = CheckpointWriter(model, pin=False)
    good = save(writer, tmp_path, 2, model, optimizer)
    writer.wait()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # the optimizer's file fails after the weights were written
    save(writer, tmp_path, 4, model, optimizer)
    with pytest.raises(RuntimeError, match="No space left on device"):
        writer.wait()
    assert (tmp_path / "tmp-checkpoint-4" / "model.safetensors").is_file()  # the half-written one stays aside
    assert artifacts.checkpoints(tmp_path) == [good]
    assert get_last_checkpoint(str(tmp_path)) == str(good)  # what the Trainer would resume from
    assert check_run_dir(tmp_path, overwrite=False, resume=True) == good  # what --resume passes it


@pytest.mark.parametrize("how", ["abandon", "wait"])
def test_a_checkpoint_whose_small_files_failed_is_never_renamed_into_place(tmp_path, trained, how):
    """The training thread failed while writing trainer_state.json and the rest: abandoned explicitly, or just waited
    for (an exception's clean-up), the staged checkpoint is deleted instead of becoming a checkpoint-N to resume."""
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    good = save(writer, tmp_path, 2, model, optimizer)
    writer.stage(tmp_path / "checkpoint-4", model.state_dict(), optimizer.state_dict())  # no small files follow
    if how == "abandon":
        writer.abandon()
    writer.wait()
    assert artifacts.checkpoints(tmp_path) == [good]
    assert not (tmp_path / "tmp-checkpoint-4").exists()
    save(writer, tmp_path, 6, model, optimizer)  # the writer goes on
    writer.wait()
    assert artifacts.checkpoints(tmp_path) == [good, tmp_path / "checkpoint-6"]


def test_final_model_is_the_best_checkpoint_with_its_projection_tied(smoke_runs):
    run_dir = smoke_runs["modified.py"]
    best = run_dir / Path(json.loads((run_dir / artifacts.METRICS).read_text())["train"]["best_checkpoint"]).name
    final = load_file(run_dir / artifacts.FINAL_MODEL / "model.safetensors")
    checkpoint = load_file(best / "model.safetensors")
    assert final.keys() == checkpoint.keys()
    for name in final:
        assert torch.equal(final[name], checkpoint[name]), name
    model = AutoModelForCausalLM.from_pretrained(run_dir / artifacts.FINAL_MODEL)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_the_final_model_is_linked_to_the_checkpoint_once_it_is_complete(tmp_path, trained):
    """also_link_model_files: the final model's files are the checkpoint's own (hard links), made after its write."""
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    final = tmp_path / "checkpoint-2"
    staging = writer.stage(final, model.state_dict(), optimizer.state_dict())
    assert not writer.also_link_model_files(tmp_path / "checkpoint-1", tmp_path / "other")  # not the one in progress
    assert writer.also_link_model_files(final, tmp_path / "final_model")
    (staging / "trainer_state.json").write_text("{}")
    writer.small_files_written()
    writer.wait()
    linked = {p.name for p in (tmp_path / "final_model").iterdir()}
    assert linked == {"config.json", "generation_config.json", "model.safetensors"}  # no optimizer, no trainer state
    for name in linked:
        assert (tmp_path / "final_model" / name).samefile(final / name)
    written = load_file(tmp_path / "final_model" / "model.safetensors")
    for name, tensor in written.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert not writer.also_link_model_files(final, tmp_path / "other")  # nothing in progress to add it to


def test_buffers_reserved_ahead_are_the_ones_the_first_save_fills(tmp_path, trained):
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    writer.reserve(optimizer_moments=2)
    writer._reserving.join()  # allocated in the background
    reserved = {id(b) for spares in writer._model_buffers._spare.values() for b in spares}
    reserved |= {id(b) for spares in writer._optimizer_buffers._spare.values() for b in spares}
    final = save(writer, tmp_path, 2, model, optimizer)
    used = {id(b) for b in writer._model_buffers._buffers.values()}
    moments = [b for path, b in writer._optimizer_buffers._buffers.items() if path.endswith(("exp_avg", "exp_avg_sq"))]
    assert used <= reserved and {id(b) for b in moments} <= reserved
    assert len(moments) == 2 * len([p for p in model.parameters() if p.requires_grad])
    assert not writer._model_buffers._spare and not writer._optimizer_buffers._spare  # the unused ones let go
    writer.wait()
    weights = load_file(final / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_a_failed_allocation_ahead_leaves_it_to_the_first_save(tmp_path, trained, monkeypatch, capsys):
    from common.checkpoint_writer import HostSnapshot

    def no_host_memory(self, like):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(HostSnapshot, "reserve", no_host_memory)
    model, optimizer = trained
    writer = CheckpointWriter(model, pin=False)
    writer.reserve(optimizer_moments=2)
    final = save(writer, tmp_path, 2, model, optimizer)
    writer.close()
    assert "could not be allocated ahead (CUDA error: out of memory)" in capsys.readouterr().out
    weights = load_file(final / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
