"""Checkpoint behaviours pinned for the mutants that survived `make mutate` (docs/mutation.md).

Git provenance (commit read from the repository files, dirty flag, no repository, no git), DDP unwrapping, CUDA RNG
bookkeeping (with a stand-in ``torch.cuda`` on CPU), the GradScaler round trip, ``weights_only`` loading, the
loader's return value and the exact error messages.
"""

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import blip2lib.checkpoint as ck

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="needs the git executable")


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def _head_from_files(repo: Path) -> str:
    """The commit of HEAD read from .git's plain files (independent of `git rev-parse`)."""
    head = (repo / ".git" / "HEAD").read_text().strip()
    assert head.startswith("ref: ")
    return (repo / ".git" / head.removeprefix("ref: ")).read_text().strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never climb into an enclosing checkout
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    (r / "a.txt").write_text("one\n")
    _git(r, "add", "a.txt")
    _git(r, "commit", "-q", "-m", "first")
    elsewhere = tmp_path / "elsewhere"  # the process runs outside the repository: `where` alone must locate it
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return r


@needs_git
def test_git_state_reads_commit_and_tracked_changes_only(repo):
    sha = _head_from_files(repo)
    assert ck.git_state(repo) == {"commit": sha, "dirty": False}
    (repo / "untracked.txt").write_text("new\n")  # untracked files do not count
    assert ck.git_state(repo) == {"commit": sha, "dirty": False}
    (repo / "a.txt").write_text("two\n")
    assert ck.git_state(repo) == {"commit": sha, "dirty": True}


@needs_git
def test_git_state_dirty_is_unknown_when_git_status_fails(repo):
    sha = _head_from_files(repo)
    (repo / ".git" / "index").write_bytes(b"not an index")  # `git status` fails, `git rev-parse HEAD` still works
    assert ck.git_state(repo) == {"commit": sha, "dirty": None}


@needs_git
def test_git_state_outside_a_repository_and_without_git(repo, tmp_path, monkeypatch):
    assert ck.git_state(tmp_path / "elsewhere") == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git cannot be found: OSError, never a failed run
    assert ck.git_state(repo) == {"commit": None, "dirty": None}


@needs_git
def test_git_state_defaults_to_the_checkout_holding_blip2lib(repo):
    here = Path(ck.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("blip2lib is not inside a git checkout here")
    assert ck.git_state()["commit"] == head.stdout.strip()


def test_ddp_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = nn.Linear(3, 2)
        sd = ck.trainable_state_dict(nn.parallel.DistributedDataParallel(net))
    finally:
        dist.destroy_process_group()
    assert set(sd) == {"weight", "bias"}  # no "module." prefix
    assert torch.equal(sd["weight"], net.weight)


def test_unknown_buffer_is_named():
    with pytest.raises(KeyError, match=r"buffer 'nope' not found in the model"):
        ck.trainable_state_dict(nn.Linear(2, 2), buffers=("nope",))


# ---- CUDA RNG bookkeeping, with a stand-in torch.cuda (the logic is pinned on CPU) ----


class FakeCuda:
    def __init__(self, available: bool, count: int):
        self.available, self.count, self.restored = available, count, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7 + i]) for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))
        return self


def test_rng_state_has_an_empty_cuda_list_without_cuda(monkeypatch):
    FakeCuda(False, 2).install(monkeypatch)  # devices listed but CUDA unusable (e.g. a driver mismatch)
    state = ck.get_rng_state()
    assert state["cuda"] == []
    assert state["numpy"][1].dtype == torch.int64


def test_rng_state_saves_every_cuda_device(monkeypatch):
    FakeCuda(True, 2).install(monkeypatch)
    assert [t.item() for t in ck.get_rng_state()["cuda"]] == [7, 8]


def test_cuda_states_restored_for_the_devices_present(monkeypatch):
    fake = FakeCuda(True, 1).install(monkeypatch)
    state = {**ck.get_rng_state(), "cuda": [torch.tensor([1]), torch.tensor([2])]}  # saved on 2 GPUs, 1 here
    ck.set_rng_state(state)
    assert len(fake.restored) == 1 and [t.item() for t in fake.restored[0]] == [1]


def test_cuda_states_ignored_without_cuda(monkeypatch):
    fake = FakeCuda(False, 0).install(monkeypatch)
    ck.set_rng_state({**ck.get_rng_state(), "cuda": [torch.tensor([1])]})  # a GPU checkpoint resumed on CPU
    assert fake.restored == []


# ---- save / load round trips ----


def _save(root: Path, net: nn.Module, step: int = 1, **kw):
    kw.setdefault("scaler", None)
    return ck.save_training_state(root, model=net, optimizer=None, scheduler_state=None, step=step,
                                  data_state={"position": 3}, extra=None, config={"stage": "s"}, **kw)  # fmt: skip


def test_load_returns_step_rng_manifest_and_path(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(2, 2)
    d = _save(tmp_path, net, step=4)
    saved_rng = torch.load(d / ck.STATE_FILE, weights_only=True)["rng"]
    out = ck.load_training_state(d, nn.Linear(2, 2), restore_rng=False)
    assert set(out) == {"step", "data_state", "extra", "scheduler", "rng", "manifest", "path"}
    assert out["step"] == 4 and out["path"] == d and out["data_state"] == {"position": 3}
    assert out["manifest"] == json.loads((d / ck.MANIFEST_FILE).read_text())
    assert torch.equal(out["rng"]["torch"], saved_rng["torch"])


def test_grad_scaler_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**5, growth_interval=7)
    d = _save(tmp_path, nn.Linear(2, 2), scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ck.load_training_state(d, nn.Linear(2, 2), scaler=fresh)
    assert fresh.get_scale() == 32.0 and fresh.get_growth_interval() == 7
    ck.load_training_state(d, nn.Linear(2, 2), scaler=None)  # a saved scaler is simply not restored


def test_best_pointer_to_an_incomplete_checkpoint_is_none(tmp_path):
    d = _save(tmp_path, nn.Linear(2, 2), best_metric=1.0)
    assert ck.best_checkpoint(tmp_path) == d
    (d / ck.MANIFEST_FILE).unlink()
    assert ck.best_checkpoint(tmp_path) is None


def _rewrite_manifest_digest(d: Path, name: str) -> None:
    import hashlib

    man = json.loads((d / ck.MANIFEST_FILE).read_text())
    man["files"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / ck.MANIFEST_FILE).write_text(json.dumps(man))


class Payload:
    """Not an allow-listed type: only a full (unsafe) unpickler could rebuild it."""


def test_train_state_is_loaded_weights_only(tmp_path):
    d = _save(tmp_path, nn.Linear(2, 2))
    state = torch.load(d / ck.STATE_FILE, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, d / ck.STATE_FILE)
    _rewrite_manifest_digest(d, ck.STATE_FILE)  # a consistent manifest: only weights_only stands in the way
    with pytest.raises(pickle.UnpicklingError):
        ck.load_training_state(d, nn.Linear(2, 2))


def test_missing_listed_file_is_named(tmp_path):
    d = _save(tmp_path, nn.Linear(2, 2))
    (d / ck.STATE_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match=rf"^{d / ck.STATE_FILE}: file listed in the manifest is missing$"):
        ck.load_training_state(d, nn.Linear(2, 2))


def test_key_mismatch_lists_at_most_five_keys_each(tmp_path):
    d = _save(tmp_path, nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(7)]))  # keys 0.weight … 6.weight
    other = nn.Sequential(*[nn.Sequential(nn.Linear(1, 1, bias=False)) for _ in range(7)])  # 0.0.weight … 6.0.weight
    missing = sorted(f"{i}.0.weight" for i in range(7))[:5]
    unexpected = [f"{i}.weight" for i in range(5)]
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_training_state(d, other)
    assert str(err.value) == f"{d}: missing trainable keys {missing}, unexpected keys {unexpected}"


# ---- manifest, best pointer, pruning, logging ----


def test_manifest_and_best_files_are_indented_json_with_format_and_time(tmp_path):
    d = _save(tmp_path, nn.Linear(2, 2), best_metric=0.25)
    text = (d / ck.MANIFEST_FILE).read_text()
    man = json.loads(text)
    assert text == json.dumps(man, indent=2)  # human-readable, as written
    assert man["format"] == 1 and man["best_metric"] == 0.25
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", man["created"])
    best = (tmp_path / ck.BEST_FILE).read_text()
    assert best == json.dumps({"checkpoint": "ckpt-1", "step": 1, "metric": 0.25}, indent=2)


def test_non_json_config_values_are_stringified(tmp_path):
    d = ck.save_training_state(tmp_path, model=nn.Linear(2, 2), optimizer=None, scheduler_state=None, scaler=None,
                               step=1, data_state=None, extra=None, config={"data": Path("/x/y")})  # fmt: skip
    assert json.loads((d / ck.MANIFEST_FILE).read_text())["config"] == {"data": "/x/y"}


@pytest.mark.parametrize("higher", [True, False])
def test_a_tie_keeps_the_earlier_best(tmp_path, higher):
    net = nn.Linear(2, 2)
    _save(tmp_path, net, step=1, best_metric=0.5, higher_is_better=higher)
    _save(tmp_path, net, step=2, best_metric=0.5, higher_is_better=higher)
    assert json.loads((tmp_path / ck.BEST_FILE).read_text())["checkpoint"] == "ckpt-1"


def test_default_keeps_the_last_three_in_a_new_nested_directory(tmp_path):
    root = tmp_path / "a" / "b" / "ckpt"  # parents are created
    for step in range(1, 6):
        _save(root, nn.Linear(2, 2), step=step)
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-3", "ckpt-4", "ckpt-5"]


def test_a_stale_temporary_leftover_never_fails_a_save(tmp_path):
    tmp_path.joinpath(".tmp-ckpt-7-123").write_text("not a directory: rmtree raises, and must be ignored")
    assert _save(tmp_path, nn.Linear(2, 2)) == tmp_path / "ckpt-1"


def test_the_original_error_surfaces_after_the_rename(tmp_path, monkeypatch):
    # A failure after os.replace (fsync of the parent) leaves no temporary directory to clean: the cleanup must not
    # hide the original error behind a FileNotFoundError.
    real = ck._fsync

    def failing(path):
        if Path(path) == tmp_path:
            raise OSError("disk went away")
        real(path)

    monkeypatch.setattr(ck, "_fsync", failing)
    with pytest.raises(OSError, match="^disk went away$"):
        _save(tmp_path, nn.Linear(2, 2))


def test_save_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="blip2lib.checkpoint"):
        d = _save(tmp_path, nn.Linear(2, 2))
    assert f"saved checkpoint {d}" in caplog.messages


# ---- the blip2lib version recorded in the manifest ----


def test_version_prefers_the_package_attribute(monkeypatch):
    import blip2lib

    monkeypatch.setattr(blip2lib, "__version__", "9.9.9", raising=False)
    assert ck._versions()["blip2lib"] == "9.9.9"


def test_version_falls_back_to_the_installed_metadata(monkeypatch):
    import importlib.metadata as md

    import blip2lib

    try:
        installed = md.version("blip2lib")
    except md.PackageNotFoundError:
        pytest.skip("blip2lib is not installed")
    monkeypatch.delattr(blip2lib, "__version__", raising=False)
    assert ck._versions()["blip2lib"] == installed

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert ck._versions()["blip2lib"] is None
