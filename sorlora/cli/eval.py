"""``sorlora eval``: score a published adapter, MoE or the bare base on held-out questions; and a peer's own scores.

``sorlora eval TARGET`` takes a repo id on ``--hub`` (a peer's adapter, revision ``final`` when it has that tag, or an
MoE repo), a local folder holding either, or ``base`` (the bare base model, ``--model`` or the bundled one), and a
data file (the formats of ``sorlora peer --data``: the whole file, or its ``split=test`` records, or with
``--test-share``/``--seed`` exactly the share a peer held back) or a registry task (its test split). It prints
accuracy and acc_norm (lm-evaluation-harness's multiple-choice log-likelihood scores,
:mod:`sorlora.evaluation.scoring`) with 95% Wilson score intervals (:func:`sorlora.evaluation.stats.wilson_interval`)
and the number of questions; ``--json`` prints the result as JSON; ``--push-card`` writes it into the repo's card
(``model-index`` metadata of its README.md, merged with the results already there).

The base a published repo names (``base_model_name_or_path``) is loaded by :func:`~sorlora.runtime.model_loading.
load_base` (the bundled model, a Hub id, the tiny test model); ``--model PATH_OR_ID`` gives another copy of it; a
base that cannot be loaded is one line saying so. :func:`member_scores` is what ``sorlora peer`` runs at the end:
its own final adapter and the collaboration's MoE on its held-out share, over the base it already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError, one_line

__all__ = [
    "add_eval_commands",
    "load_for_eval",
    "member_scores",
    "print_member_scores",
    "publish_member_scores",
    "score_examples",
    "summary_line",
]

LEVEL = 0.95


def score_examples(model: Any, tokenizer: Any, examples: Sequence[Any], *, name: str, max_len: int = 256,
                   batch_size: int = 8, precision: str = "float32") -> dict[str, Any]:  # fmt: skip
    """Accuracy and acc_norm of ``model`` on multiple-choice ``examples`` with their 95% Wilson score intervals
    (:func:`~sorlora.evaluation.stats.wilson_interval`), the number scored and the number too long for ``max_len``
    (skipped)."""
    from ..data.examples import Task
    from ..evaluation.scoring import evaluate
    from ..evaluation.stats import wilson_interval

    result = evaluate(model, tokenizer, Task(name=name, kind="held-out", train=[], test=list(examples)),
                      max_len=max_len, batch_size=batch_size, precision=precision)  # fmt: skip
    out: dict[str, Any] = {"task": name, "n": result["n"], "n_truncated": result["n_truncated"], "level": LEVEL}
    for key, column in (("accuracy", "correct"), ("acc_norm", "correct_norm")):
        correct = sum(c for c in result[column] if c is not None)
        out[key], out[f"{key}_ci"] = result[key], list(wilson_interval(correct, result["n"], level=LEVEL))
    return out


def summary_line(label: str, score: dict[str, Any]) -> str:
    """One line: ``label``, accuracy and acc_norm in percent with their intervals, and the number of questions."""
    acc, (lo, hi) = score["accuracy"], score["accuracy_ci"]
    norm, (nlo, nhi) = score["acc_norm"], score["acc_norm_ci"]
    skipped = f", {score['n_truncated']} too long skipped" if score.get("n_truncated") else ""
    return (f"{label}: accuracy {100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], acc_norm {100 * norm:.1f}% "
            f"[{100 * nlo:.1f}, {100 * nhi:.1f}] ({int(100 * score['level'])}% intervals), "
            f"{score['n']} questions of {score['task']}{skipped}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- a peer's own
def _final_report(hub: Any, repo: str, revision: str) -> dict[str, Any]:
    """A member's ``report.json`` at ``revision`` (its ``final``), size-capped and parsed safely ({} when unusable)."""
    from sorlora_gossip.hub.base import EntryNotFound
    from sorlora_gossip.layout import MAX_REPORT_BYTES, REPORT_FILE
    from sorlora_gossip.untrusted import read_json

    try:
        report = read_json(hub, repo, REPORT_FILE, revision=revision, max_bytes=MAX_REPORT_BYTES)
    except (EntryNotFound, ValueError):  # PayloadError is a ValueError
        return {}
    return report if isinstance(report, dict) else {}


def member_scores(program: Any) -> dict[str, Any]:
    """A finished :class:`~sorlora.protocol.program.PeerProgram`'s held-out scores: its own final adapter as
    published (``final``) and, for a method with one, the collaboration's MoE, each on the member's held-out
    questions (``program.data.test``), over the base the program holds; ``better`` names the stronger."""
    from sorlora_gossip.hub.base import EntryNotFound, RepoNotFound
    from sorlora_gossip.layout import EXPERT_FILE, FINAL_TAG
    from sorlora_gossip.untrusted import MAX_REPO_FILE_BYTES

    from ..protocol.collab import read_capped
    from ..runtime.moe import load_moe
    from ..runtime.workspace import adapter_name

    hub, terms, ws, tok = program.hub, program.terms, program.ws, program.tokenizer
    kw = {"name": program.data.task, "max_len": max(terms.max_len, 256), "batch_size": terms.batch_size,
          "precision": terms.precision}  # fmt: skip
    repo = hub.repo_id(program.peer_id)
    sha = hub.resolve(repo, FINAL_TAG)
    kind = terms.spec.kind
    part = kind.payload_cls.from_bytes(read_capped(hub, repo, EXPERT_FILE, sha, MAX_REPO_FILE_BYTES))
    name = adapter_name(program.plan["members"].index(program.peer_id))
    ws.load_view({name: part})
    ws.activate([name])
    out: dict[str, Any] = {"adapter": {"repo": f"{repo}@{FINAL_TAG}", **score_examples(ws.network, tok,
                                                                                       program.data.test, **kw)}}  # fmt: skip
    if terms.spec.final == "moe":
        named = _final_report(hub, repo, sha).get("moe")  # the collaboration's MoE, as its report names it
        moe_repo = named.get("repo") if isinstance(named, dict) else None
        try:
            if not isinstance(moe_repo, str):
                raise ValueError(f"{repo}@{FINAL_TAG}: its report.json names no MoE")
            moe = load_moe(hub, moe_repo, ws)
        except (RepoNotFound, EntryNotFound, OSError, ValueError) as exc:
            out["moe"] = {"repo": moe_repo, "error": one_line(exc)}
        else:
            out["moe"] = {"repo": moe_repo, **score_examples(moe, tok, program.data.test, **kw)}
            del moe
    scored = {k: v for k, v in out.items() if "accuracy" in v}
    if len(scored) > 1:
        best = max(scored, key=lambda k: scored[k]["accuracy"])
        worst = min(scored, key=lambda k: scored[k]["accuracy"])
        out["better"] = None if scored[best]["accuracy"] == scored[worst]["accuracy"] else best
    return out


def print_member_scores(peer_id: str, scores: dict[str, Any]) -> None:
    """The member's held-out scores, one line each, and which model serves its task better."""
    for key, label in (("adapter", "own adapter"), ("moe", "collaboration's MoE")):
        if key not in scores:
            continue
        if "error" in scores[key]:
            print(f"held-out {label} {scores[key]['repo']}: not scored ({scores[key]['error']})")
        else:
            print(summary_line(f"held-out {label} {scores[key]['repo']}", scores[key]))
    if "better" in scores:
        a, m = scores["adapter"], scores["moe"]
        lo_a, hi_a = a["accuracy_ci"]
        lo_m, hi_m = m["accuracy_ci"]
        overlap = " (the intervals overlap: not a clear difference)" if lo_a <= hi_m and lo_m <= hi_a else ""
        if scores["better"] is None:
            print(f"peer {peer_id}: own adapter and MoE score the same on its held-out questions")
        else:
            label = "its own adapter" if scores["better"] == "adapter" else "the collaboration's MoE"
            print(f"peer {peer_id}: for its task, {label} is the better model{overlap}")


# ---------------------------------------------------------------------------------------------------- sorlora eval
def _download(hub: Any, repo_id: str, revision: str, target: Path) -> Path:
    """The repo's top-level JSON/safetensors/tokenizer files (and a shipped base's ``base/``), size-capped."""
    from moe_router.configuration import BASE_SUBFOLDER
    from sorlora_gossip.untrusted import download_repo

    return download_repo(hub, repo_id, target, revision=revision, suffixes=(".json", ".safetensors", ".model", ".txt"),
                         subfolders=(BASE_SUBFOLDER,))  # fmt: skip


def _base(base_id: str | None, model: str | None, what: str) -> tuple[Any, Any]:
    from ..runtime.model_loading import load_base

    try:
        net, tokenizer, _ = load_base(base_id, model=model)
    except (OSError, ValueError, ImportError) as exc:
        given = f"--model {model}" if model else f"the base model {base_id!r} that {what} names"
        raise UsageError(f"cannot load {given} ({one_line(exc)[:200]}): pass --model PATH_OR_ID, a local copy or "
                         "Hub id of that base") from None  # fmt: skip
    return net, tokenizer


def load_for_eval(folder: Path, *, model: str | None, what: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, "adapter" | "moe") from a folder holding a PEFT adapter or an implicit-MoE repo."""
    config = folder / "adapter_config.json"
    if config.is_file():
        from peft import PeftModel

        import peft_sorlora  # noqa: F401 - registers the SO-LoRA method with PEFT

        base_id = json.loads(config.read_text()).get("base_model_name_or_path")
        base, tokenizer = _base(base_id, model, what)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        return peft_model.get_base_model(), tokenizer, "adapter"  # the transformers model, adapter layers injected
    config = folder / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    if data.get("model_type") == "solora_moe":
        from moe_router import ImplicitMoEForCausalLM

        if data.get("base_in_repo") and model is None and (folder / "base").is_dir():
            from transformers import AutoTokenizer

            moe = ImplicitMoEForCausalLM.from_pretrained(str(folder))
            has_tokenizer = [d for d in (folder / "base", folder) if (d / "tokenizer_config.json").is_file()]
            if not has_tokenizer:
                raise UsageError(
                    f"{what} ships its base but no tokenizer: pass --model PATH_OR_ID, a copy of that base"
                )
            tokenizer = AutoTokenizer.from_pretrained(str(has_tokenizer[0]))
        else:
            from peft_sorlora.base_model import base_fingerprint

            base, tokenizer = _base(data.get("base_model_name_or_path"), model, what)
            pinned = data.get("base_fingerprint")
            if pinned and base_fingerprint(base) != pinned:
                raise UsageError(f"the base loaded for {what} ({model or data.get('base_model_name_or_path')}) is not "
                                 f"the one it was built on (weights fingerprint {pinned}): pass --model PATH_OR_ID, a "
                                 "copy of that base")  # fmt: skip
            moe = ImplicitMoEForCausalLM.from_pretrained(str(folder), base_model=base)
        return moe.eval(), tokenizer, "moe"
    raise UsageError(f"{what} holds neither adapter_config.json (a PEFT adapter) nor a solora_moe config.json "
                     "(an implicit MoE)")  # fmt: skip


def eval_examples(args: argparse.Namespace) -> tuple[str, list[Any]]:
    """(task name, questions) of ``--data``/``--task``: see the module docstring."""

    from ..data.files import read_task_file
    from ..data.registry import member_task
    from ..protocol.terms import CollabTerms

    if args.test_share is not None:
        task = member_task(args.data, args.task, test_share=args.test_share, seed=args.seed)
        return task.name, list(task.test)
    if args.data is not None:
        _, pools = read_task_file(args.data)
        return args.task or Path(args.data).stem, list(pools["test"] if "test" in pools else pools["all"])
    if not args.task:
        raise UsageError("give --data FILE or --task NAME: the questions to score on")
    task = member_task(None, args.task, test_share=CollabTerms.test_share, seed=args.seed)  # the terms' default
    return task.name, list(task.test)


def collaboration_moe(hub: Any, collab_id: str | None) -> str:
    """The MoE repo of collaboration ``collab_id``: the one its members' final reports name (the most named, should
    a member have built another); one line when there is none yet."""
    from collections import Counter

    from ..protocol.collab import collab_status

    if not collab_id:
        raise UsageError("`sorlora eval moe` scores a collaboration's MoE: name it with --collab NS/NAME")
    named = Counter(m["moe"] for m in collab_status(hub, collab_id)["members"] if m.get("moe"))
    if not named:
        raise UsageError(f"no member of {collab_id} has published its final report naming an MoE yet")
    return named.most_common(1)[0][0]


def _push_card(hub: Any, repo_id: str, name: str, score: dict[str, Any]) -> None:
    """Merge ``score`` into the ``model-index`` of the repo's README.md on ``main`` (one commit)."""
    hub.create_commit(repo_id, {"README.md": _card_with(hub, repo_id, name, score)},
                      commit_message=f"sorlora eval: {name}")  # fmt: skip


def publish_member_scores(hub: Any, peer_id: str, task: str, scores: dict[str, Any]) -> None:
    """Record a member's held-out ``scores`` (:func:`member_scores`) in its repo, in one commit on ``main``: its
    ``report.json`` gains ``heldout`` (the ``final`` tag keeps the report as first published) and its card's
    ``model-index`` the own adapter's held-out accuracy and acc_norm."""
    from sorlora_gossip.layout import FINAL_TAG, MAX_REPORT_BYTES, REPORT_FILE
    from sorlora_gossip.untrusted import read_json

    repo = hub.repo_id(peer_id)
    report = read_json(hub, repo, REPORT_FILE, revision=hub.resolve(repo, FINAL_TAG), max_bytes=MAX_REPORT_BYTES)
    report["heldout"] = scores
    files = {REPORT_FILE: json.dumps(report, indent=1).encode()}
    if "accuracy" in scores.get("adapter", {}):
        files["README.md"] = _card_with(hub, repo, f"{task} (held-out)", scores["adapter"])
    hub.create_commit(repo, files, commit_message=f"{peer_id}: held-out scores of its adapter and the MoE")


def _card_with(hub: Any, repo_id: str, name: str, score: dict[str, Any]) -> bytes:
    """The repo's README.md on ``main`` with ``score`` merged into its ``model-index`` (results for ``name``)."""
    from huggingface_hub import EvalResult, ModelCard

    from sorlora_gossip.hub.base import EntryNotFound

    try:
        text = hub.read_bytes(repo_id, "README.md", revision="main", max_bytes=1 << 20).decode()
    except EntryNotFound:
        text = "---\n---\n"
    card = ModelCard(text)
    results = [r for r in (card.data.eval_results or []) if not (r.dataset_name == name and r.metric_type in
                                                                   ("accuracy", "acc_norm"))]  # fmt: skip
    for metric in ("accuracy", "acc_norm"):
        results.append(EvalResult(task_type="multiple-choice", dataset_type=name, dataset_name=name,
                                  dataset_split="test", metric_type=metric, metric_value=round(score[metric], 4),
                                  metric_name=f"{metric} ({score['n']} questions, {int(100 * LEVEL)}% interval "
                                              f"{score[f'{metric}_ci'][0]:.3f}-{score[f'{metric}_ci'][1]:.3f})"))  # fmt: skip
    card.data.eval_results = results
    card.data.model_name = card.data.model_name or repo_id
    return str(card).encode()


def _eval(args: argparse.Namespace) -> int:
    import torch

    from sorlora_gossip.hub import open_hub
    from sorlora_gossip.hub.base import RevisionNotFound
    from sorlora_gossip.layout import FINAL_TAG

    if args.threads:
        torch.set_num_threads(args.threads)
    name, examples = eval_examples(args)  # the data is checked before any model loads
    if not examples:
        raise UsageError(f"{name}: no questions to score")
    target, hub, repo_id, revision = args.target, None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        if target == "base":
            model, tokenizer = _base(None, args.model, "base")
            label, kind = f"base {args.model or 'bundled'}", "base"
        else:
            if Path(target).is_dir():
                folder, label = Path(target), target
            else:
                hub = open_hub(args.hub, token=os.environ.get(args.token_env) or None)
                repo_id = collaboration_moe(hub, args.collab) if target == "moe" else target
                revision = args.revision
                if revision is None:
                    try:
                        hub.resolve(repo_id, FINAL_TAG)
                        revision = FINAL_TAG
                    except RevisionNotFound:
                        revision = "main"
                folder, label = (
                    _download(hub, repo_id, hub.resolve(repo_id, revision), Path(tmp)),
                    f"{repo_id}@{revision}",
                )
            model, tokenizer, kind = load_for_eval(folder, model=args.model, what=label)
        score = score_examples(model, tokenizer, examples, name=name, max_len=args.max_len,
                               batch_size=args.batch_size)  # fmt: skip
    result = {"model": label, "kind": kind, **score}
    if args.push_card:
        if repo_id is None:
            raise UsageError("--push-card writes the card of a repo on --hub: give a repo id, not a folder or base")
        _push_card(hub, repo_id, name, score)
    print(json.dumps(result, indent=1) if args.json else summary_line(label, score))
    if args.push_card and not args.json:
        print(f"card of {repo_id} updated (model-index: {name})", file=sys.stderr)
    return 0


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to an argparse subparsers object (it sets ``func``)."""
    p = subparsers.add_parser("eval", help="score a published adapter, MoE or the base on held-out questions",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", metavar="REPO_OR_FOLDER",
                   help="a repo id on --hub (adapter or MoE), a local folder holding one, `base`, or `moe` (the "
                   "MoE of the collaboration --collab names)")  # fmt: skip
    p.add_argument("--collab", default=None, metavar="NS/NAME", help="the collaboration whose MoE `moe` scores")
    p.add_argument("--hub", default=os.environ.get("SORLORA_HUB", "hub"),
                   help="hub folder, `sorlora hub-serve` URL or Hub endpoint (default: $SORLORA_HUB or ./hub)")  # fmt: skip
    p.add_argument("--token-env", default="HF_TOKEN", metavar="VAR",
                   help="environment variable holding your Hub token (default: HF_TOKEN)")  # fmt: skip
    p.add_argument("--revision", default=None, help="revision of the repo (default: `final` when tagged, else main)")
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="local copy or Hub id of the base (default: the base the repo names)")  # fmt: skip
    p.add_argument("--data", default=None, metavar="FILE",
                   help="questions: a JSONL/CSV task file as for `sorlora peer --data` (all of it, or its split=test "
                   "records)")  # fmt: skip
    p.add_argument(
        "--task", default=None, metavar="NAME", help="a registry task (its test split), or the name of --data"
    )
    p.add_argument("--test-share", type=float, default=None, metavar="SHARE",
                   help="score only this held-out share of --data, as `sorlora peer` splits it (with --seed)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (the terms' seed)")
    p.add_argument("--max-len", type=int, default=256, help="tokens of a question with its longest option")
    p.add_argument("--batch-size", type=int, default=8, help="questions scored together")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--push-card", action="store_true",
                   help="write the result into the repo card's model-index (README.md metadata)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)
