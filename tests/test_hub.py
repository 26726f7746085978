"""Hub round trip: complete repositories, push_to_hub's uploads, and downloads through a real offline Hub server.

The server is olah (PyPI) in offline mode on 127.0.0.1, serving git repositories whose safetensors are in
git-LFS. Checkpoints are published with real git + git-lfs; no local server accepts uploads, so the upload
calls of `push_to_hub` are checked at the huggingface_hub API boundary (`HfApi.create_commit`: which files,
which commit message), and the captured commit is then applied to the served repository with git, so what
push_to_hub uploads is also loaded back through the Hub client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, RepoUrl
from transformers import AutoModelForCausalLM

from hf_outliertune import FORMAT_VERSION
from hf_outliertune.cli import main
from hf_outliertune.hub import push_quantized

from conftest import NUM_THREADS, logits_of, small_config
from tiny_models import sample_text

ORG = "tiny-org"
REPO = f"{ORG}/quantized"
# Each mode is quantized from the same tiny Llama; w8a8 is published by git as tag v1, the others by push_to_hub.
MODES = {
    "w8a8": {},
    "w6a6": {"weight_bits": 6, "act_bits": 6},
    "w4_adadim": {"act_bits": None, "weight_bits": 4, "group_size": 16, "weight_algorithm": "rtn"},
}
SERVER_START_TIMEOUT_S = 30
GIT_ENV = {
    "GIT_AUTHOR_NAME": "hf-outliertune tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "hf-outliertune tests", "GIT_COMMITTER_EMAIL": "tests@localhost",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
}


def _require(what: str, ok: bool) -> None:
    """Skip on a developer machine that lacks a test tool; fail in CI, where .ci/setup.sh installs it."""
    if ok:
        return
    message = f"{what} is not installed; bash .ci/setup.sh installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def git(cwd: str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class HubRepo:
    """A git repository served by olah (non-bare, as olah needs) and a clone that publishes to it by git push."""

    def __init__(self, mirrors: str, root: str, repo_id: str) -> None:
        self.served = os.path.join(mirrors, "models", *repo_id.split("/"))
        os.makedirs(self.served)
        git(self.served, "init", "-q", "-b", "main")
        git(self.served, "config", "receive.denyCurrentBranch", "updateInstead")
        git(self.served, "lfs", "install", "--local")
        self.work = os.path.join(root, "clone")
        git(root, "clone", "-q", self.served, self.work)
        git(self.work, "lfs", "install", "--local")
        git(self.work, "lfs", "track", "*.safetensors")

    def files(self) -> list[str]:
        """The files of the last commit (none before the first)."""
        return git(self.work, "ls-files").splitlines() if git(self.work, "branch", "--list") else []

    def publish(self, adds: dict[str, bytes], deletes: list[str], message: str, tag: str | None = None) -> str:
        """Commit these changes, push them (git-lfs uploads the safetensors), return the commit sha."""
        for path in deletes:
            git(self.work, "rm", "-q", path)
        for path, data in adds.items():
            os.makedirs(os.path.dirname(os.path.join(self.work, path)) or self.work, exist_ok=True)
            with open(os.path.join(self.work, path), "wb") as f:
                f.write(data)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        refs = ["main"]
        if tag:
            git(self.work, "tag", tag)
            refs.append(tag)
        git(self.work, "push", "-q", "origin", *refs)
        return git(self.work, "rev-parse", "HEAD")


@contextlib.contextmanager
def olah_server(root: str):
    """Start olah on a free loopback port in offline mode serving `root/mirrors`; yield its URL; stop it."""
    exe = shutil.which("olah-cli", path=os.path.dirname(sys.executable)) or shutil.which("olah-cli")
    _require("olah (pip install olah)", exe is not None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    netloc = f"127.0.0.1:{port}"
    with open(os.path.join(root, "olah.toml"), "w", encoding="utf-8") as f:
        f.write(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "./olah_cache"
mirror-scheme = "http"
mirror-netloc = "{netloc}"
mirror-lfs-netloc = "{netloc}"
mirrors-path = ["./mirrors"]
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"

[accessibility]
offline = true
""")
    log = open(os.path.join(root, "olah.out"), "w")
    proc = subprocess.Popen([exe, "-c", "olah.toml", "--log-path", "./logs"], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://{netloc}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/models/none/none/revision/main", timeout=2)
                break
            except urllib.error.HTTPError:  # any HTTP answer means the server is up
                break
            except OSError:
                assert proc.poll() is None, f"olah exited with {proc.returncode}: {open(log.name).read()[-3000:]}"
                assert time.monotonic() < deadline, f"olah did not answer in {SERVER_START_TIMEOUT_S} s"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


class WriteApi:
    """Stands in for the Hub's write endpoints at the huggingface_hub API boundary: records every call and
    applies each commit to the served git repository, returning the real commit sha."""

    def __init__(self, repo: HubRepo | None = None) -> None:
        self.repo = repo
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.commits: list[dict[str, Any]] = []

    def patch(self, mp: pytest.MonkeyPatch) -> None:
        mp.setattr(HfApi, "create_repo", self.create_repo)
        mp.setattr(HfApi, "create_branch", self.create_branch)
        mp.setattr(HfApi, "list_repo_files", self.list_repo_files)
        mp.setattr(HfApi, "create_commit", self.create_commit)

    def create_repo(self, repo_id: str, **kwargs: Any) -> RepoUrl:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
        self.calls.append(("list_repo_files", {"repo_id": repo_id, **kwargs}))
        return (self.repo.files() if self.repo else None) or [".gitattributes"]

    def create_commit(self, repo_id: str, operations: list, **kwargs: Any) -> CommitInfo:
        adds, deletes = {}, []
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                with open(op.path_or_fileobj, "rb") as f:  # the pushed temp folder is gone after the call
                    adds[op.path_in_repo] = f.read()
            else:
                assert isinstance(op, CommitOperationDelete), op
                deletes.append(op.path_in_repo)
        self.commits.append({"repo_id": repo_id, "adds": adds, "deletes": deletes, **kwargs})
        oid = self.repo.publish(adds, deletes, kwargs["commit_message"]) if self.repo else "0" * 40
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}", oid=oid,
                          commit_message=kwargs["commit_message"], commit_description="", pr_url=None)


_PULL = r"""
import hashlib, json, os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import hf_outliertune
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from transformers import AutoModelForCausalLM
plan = json.load(open(sys.argv[2]))
ids = torch.load(plan["ids"])
out = {"logits": {}, "files": {}}
def logits(model):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
for name, rev in plan["revisions"].items():
    kwargs = {"device_map": "auto"} if name == plan["device_map_auto"] else {}
    out["logits"][name] = logits(AutoModelForCausalLM.from_pretrained(plan["repo"], revision=rev, **kwargs))
    out["files"][name] = sorted(HfApi().list_repo_files(plan["repo"], revision=rev))
folder = snapshot_download(plan["repo"], revision=plan["snapshot_rev"])
out["snapshot"] = {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
                   for f in os.listdir(folder)}
out["logits"]["snapshot_dir"] = logits(AutoModelForCausalLM.from_pretrained(folder))
cfg = json.load(open(hf_hub_download(plan["repo"], "config.json", revision=plan["snapshot_rev"])))
out["format_version"] = cfg["quantization_config"]["format_version"]
out["readme"] = open(hf_hub_download(plan["repo"], "README.md", revision=plan["snapshot_rev"])).read()
torch.save(out, plan["out"])
"""


@pytest.fixture(scope="module")
def quantized(tiny_dir, eval_ids) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Each mode's tiny Llama quantized on load, with its logits."""
    models = {}
    for mode in MODES:
        model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(**MODES[mode]),
                                                     dtype=torch.float32)
        models[mode] = (model, logits_of(model, eval_ids))
    return models


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, quantized, eval_ids) -> dict[str, Any]:
    """Publish w8a8 by save_pretrained + git (tag v1), then the other modes by push_to_hub, all to one repo served
    by olah; pull every revision back in a fresh process through HF_ENDPOINT."""
    _require("git", shutil.which("git") is not None)
    _require("git-lfs", subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0)
    root = str(tmp_path_factory.mktemp("hub"))
    with olah_server(root) as endpoint:
        repo = HubRepo(os.path.join(root, "mirrors"), root, REPO)
        saved = os.path.join(root, "saved_w8a8")
        quantized["w8a8"][0].save_pretrained(saved, max_shard_size="100KB")
        adds = {}
        for name in os.listdir(saved):
            with open(os.path.join(saved, name), "rb") as f:
                adds[name] = f.read()
        shas = {"w8a8": repo.publish(adds, [], "w8a8 via git", tag="v1")}
        files_before = {"w8a8": repo.files()}
        writes = WriteApi(repo)
        with pytest.MonkeyPatch.context() as mp:
            writes.patch(mp)
            for mode in MODES:
                if mode != "w8a8":
                    files_before[mode] = repo.files()
                    shas[mode] = quantized[mode][0].push_to_hub(REPO, commit_message=f"{mode} via push_to_hub").oid
        revisions = {"w8a8": "v1", **{m: shas[m] for m in MODES if m != "w8a8"}}
        plan = {"repo": REPO, "revisions": revisions, "device_map_auto": "w6a6", "snapshot_rev": "v1",
                "ids": os.path.join(root, "ids.pt"), "out": os.path.join(root, "pulled.pt")}
        torch.save(eval_ids, plan["ids"])
        with open(os.path.join(root, "plan.json"), "w") as f:
            json.dump(plan, f)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=endpoint, HF_HOME=os.path.join(root, "hf_home"), TQDM_DISABLE="1",
                   TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run([sys.executable, "-c", _PULL, str(NUM_THREADS), os.path.join(root, "plan.json")],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        pulled = torch.load(plan["out"])
    return {"saved": saved, "shas": shas, "pulled": pulled, "writes": writes, "files_before": files_before}


def test_save_pretrained_writes_a_complete_repo(quantized, tmp_path, eval_ids):
    model, logits = quantized["w8a8"]
    out = str(tmp_path / "repo")
    model.save_pretrained(out, max_shard_size="100KB")
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "model.safetensors.index.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))], files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) >= 3 and set(shards) <= files
    for shard in shards:  # max_shard_size honoured (a shard may exceed it only to hold one big tensor)
        size = os.path.getsize(os.path.join(out, shard))
        assert size <= 100_000 + 1024 or sum(v == shard for v in index.values()) == 1, (shard, size)
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "hf_outliertune" and qc["format_version"] == FORMAT_VERSION
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert "hf-outliertune" in card.data.tags and card.data.library_name == "transformers"
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(out), eval_ids), logits)


@pytest.mark.parametrize("mode", list(MODES))
def test_pulled_through_the_hub_equals_local(round_trip, quantized, mode):
    pulled = round_trip["pulled"]["logits"][mode]
    assert torch.equal(pulled, quantized[mode][1])


def test_revisions_are_pinned(round_trip, quantized):
    logits = round_trip["pulled"]["logits"]
    assert not torch.equal(logits["w8a8"], logits["w6a6"])  # tag v1 still serves w8a8 after later commits
    assert torch.equal(logits["snapshot_dir"], quantized["w8a8"][1])


def test_snapshot_is_byte_identical_to_the_saved_repo(round_trip):
    saved = round_trip["saved"]
    snapshot = round_trip["pulled"]["snapshot"]
    assert set(snapshot) == set(os.listdir(saved)) | {".gitattributes"}
    for name in os.listdir(saved):
        assert snapshot[name] == sha256(os.path.join(saved, name)), name
    assert round_trip["pulled"]["format_version"] == FORMAT_VERSION
    assert "hf-outliertune" in ModelCard(round_trip["pulled"]["readme"]).data.tags


def test_push_to_hub_uploads_one_complete_commit(round_trip):
    writes, files_before = round_trip["writes"], round_trip["files_before"]
    pushed = [m for m in MODES if m != "w8a8"]
    assert [c["commit_message"] for c in writes.commits] == [f"{m} via push_to_hub" for m in pushed]
    for mode, commit in zip(pushed, writes.commits):
        assert commit["repo_id"] == REPO and commit["revision"] is None and not commit["create_pr"]
        adds = set(commit["adds"])
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= adds
        # the earlier push's shards and index are deleted, nothing else is
        stale = {f for f in files_before[mode] if f.startswith("model") and f not in adds}
        assert set(commit["deletes"]) == stale
        assert sorted(round_trip["pulled"]["files"][mode]) == sorted(adds | {".gitattributes"})
        readme = commit["adds"]["README.md"].decode()
        assert f'from_pretrained("{REPO}"' in readme
        qc = json.loads(commit["adds"]["config.json"])["quantization_config"]
        assert qc["weight_bits"] == MODES[mode]["weight_bits"] and qc["act_bits"] == MODES[mode]["act_bits"]
    assert ("create_repo", {"repo_id": REPO, "private": None, "exist_ok": True}) in writes.calls


def test_push_to_a_branch_creates_it(quantized):
    writes = WriteApi()
    with pytest.MonkeyPatch.context() as mp:
        writes.patch(mp)
        info = push_quantized(quantized["w8a8"][0], REPO, revision="w8a8-v2", private=True, max_shard_size="100KB")
    assert info.oid == "0" * 40
    assert ("create_branch", {"repo_id": REPO, "branch": "w8a8-v2", "exist_ok": True}) in writes.calls
    assert ("create_repo", {"repo_id": REPO, "private": True, "exist_ok": True}) in writes.calls
    (commit,) = writes.commits
    assert commit["revision"] == "w8a8-v2" and "model.safetensors.index.json" in commit["adds"]


def test_cli_push_to_hub_carries_the_measured_perplexity(tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    report = tmp_path / "report.json"
    writes = WriteApi()
    with pytest.MonkeyPatch.context() as mp:
        writes.patch(mp)
        code = main(["quantize", "--model", tiny_dir("llama"), "--calib", str(text), "--eval", str(text),
                     "--num-samples", "4", "--seq-len", "32", "--eval-seq-len", "32", "--max-windows", "2",
                     "--weight-algorithm", "absmax", "--push-to-hub", REPO, "--hub-revision", "dev", "--private",
                     "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--json", str(report)])
    assert code == 0
    figures = json.loads(report.read_text())
    assert figures["hub"] == {"repo_id": REPO, "commit": "0" * 40, "url": f"https://huggingface.co/{REPO}/commit/"
                              + "0" * 40}
    (commit,) = writes.commits
    assert commit["revision"] == "dev"
    assert ("create_repo", {"repo_id": REPO, "private": True, "exist_ok": True}) in writes.calls
    card = ModelCard(commit["adds"]["README.md"].decode())
    before, after = figures["ppl_float"]["perplexity"], figures["ppl_quantized"]["perplexity"]
    assert f"| {before:.3f} |" in card.text and f"| {after:.3f} |" in card.text
    assert f"{100 * (after / before - 1):+.2f} %" in card.text
    assert "`calib.txt`" in card.text
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized"
    assert {"tokenizer.json", "config.json"} <= set(commit["adds"])


def test_save_pretrained_with_push_uploads_only_what_it_wrote(quantized, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("a file the user keeps next to the checkpoint")
    writes = WriteApi()
    with pytest.MonkeyPatch.context() as mp:
        writes.patch(mp)
        quantized["w8a8"][0].save_pretrained(str(out), push_to_hub=True, repo_id=REPO, commit_message="save+push")
    (commit,) = writes.commits
    assert commit["commit_message"] == "save+push"
    assert set(commit["adds"]) == set(os.listdir(out)) - {"notes.txt"}
    assert {"README.md", "tokenizer.json", "model.safetensors"} <= set(commit["adds"])
