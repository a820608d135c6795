"""Which pooled features of the frozen embedded model carry what a rule reads? An L2 Bradley-Terry probe per set.

The candidates of a pipeline work folder are paired and labelled as in ``bench/reward_defaults.py`` (same rules,
prompt split and pair cap), plus the demo's ``rule_score`` (ties under 0.1). Every distinct response is run once
through the frozen base model and pooled as the shipped reward model pools it (``reward.pooling``: block
``--trunk_layers``' last + mean state, the input embeddings' mean over the attended tokens, and their max over the
response's tokens; the state with its mean over the response, as pooling ``response``; the element-wise
products of the prompt's embedding mean with the response's mean and with its max; and the prompt's coverage by
the response: its embeddings weighted by their best cosine match among the response's tokens).
``reward.probe.probe_weights`` fits a head on each feature set to the training pairs (penalty by
cross-validation over prompts); the held-out and cross-validated accuracies are recorded. No fine-tuning: it shows
what each set offers a head.

    python bench/reward_pooling_probe.py --work WORK --out bench/results/reward_pooling_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import git_commit, machine  # noqa: E402
from reward_defaults import RULES, candidates, labelled_pairs, split_pairs  # noqa: E402
from reward_depth_probe import probe_pairs  # noqa: E402

SETS = {  # feature columns, in units of H: 0 = state (last + mean over every token), 1 = embedding mean,
    "state": [0],  # 2 = embedding max over the response, 3 = embedding max over the whole row,
    "state+mean": [0, 1],  # 4 = state with the mean over the response's tokens (last + response mean)
    "state+max_row": [0, 3],
    "state+mean+max_row": [0, 1, 3],
    "state+mean+max_response": [0, 1, 2],  # pooling last_mean_embeddings_max
    "response_state": [4],
    "response_state+mean+max_response": [4, 1, 2],  # pooling response
    # 5 = the prompt's embedding mean times the response's, element-wise; 6 = the prompt's mean times the
    # response's max (diagonal bilinear prompt-response matches: what a rule about the prompt's words reads)
    "state+mean+max_response+match": [0, 1, 2, 5],
    "response_state+mean+max_response+match": [4, 1, 2, 5],
    "response_state+mean+max_response+match_max": [4, 1, 2, 6],
    "response_state+mean+max_response+both": [4, 1, 2, 5, 6],
    # 7 = coverage: the prompt's embeddings, each weighted by its best cosine match among the response's tokens,
    # averaged over the prompt (which of the prompt's words the answer takes up)
    "response_state+coverage": [4, 7],
    "response_state+mean+max_response+coverage": [4, 1, 2, 7],
    # 8 = the state with its sum (not mean) over the response's tokens (last + sum: what a count of something in
    # the answer needs); 9 = the input embeddings' sum over the response's tokens (a bag of its tokens' counts)
    "response_sum_state+mean+max_response": [8, 1, 2],
    "response_state+mean+max_response+embedding_sum": [4, 1, 2, 9],
    "response_sum_state+mean+max_response+embedding_sum": [8, 1, 2, 9],
    "state+mean+max_response+coverage": [0, 1, 2, 7],
}


def coverage(trunk, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """(B, H): per row, the mean over the prompt's tokens of e_i * max_j cos(e_i, e_j) over the response's tokens j,
    over the embedding matrix's rms."""
    from reward.pooling import _inverse_rms

    embed = trunk.get_input_embeddings()
    scale = _inverse_rms(embed.weight)
    out = []
    for b in range(ids.shape[0]):
        e = embed(ids[b]).float()
        prompt, answer = e[(mask[b] * (1 - response[b])).bool()], e[response[b].bool()]
        cos = torch.nn.functional.normalize(prompt, dim=-1) @ torch.nn.functional.normalize(answer, dim=-1).T
        out.append((prompt * cos.amax(1, keepdim=True)).mean(0) * scale)
    return torch.stack(out)


def response_sum(last: torch.Tensor, last_plus_mean: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """last + the states' sum over the response, from ``last`` and ``last + mean over the response``: (B, H)."""
    return last + (last_plus_mean - last) * response.sum(-1, keepdim=True)


def main() -> None:
    from reward.modeling import encode_for_reward, pad_right
    from reward.pooling import embedding_features, pool, response_tail_mask
    from reward.rules import rule_prefers
    from rlhf.models import block_range, load_base_model, load_tokenizer, resolve_model_path
    from rlhf.ppo.shared_prompt import decode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="pipeline work folder with labels.db (candidates)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trunk_layers", type=int, default=20)
    ap.add_argument("--max_train_pairs", type=int, default=300)
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--out", default="bench/results/reward_pooling_probe.json")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated feature sets to probe (default: all)")
    ap.add_argument("--rules", default=None, help="comma-separated rules (default: all, and the demo's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    every_rule = dict(RULES, demo_rule_score=lambda p, a, b: rule_prefers(p, a, b, min_gap=0.1))
    rule_names = args.rules.split(",") if args.rules else list(every_rule)
    set_names = args.sets.split(",")
    unknown = [n for n in rule_names if n not in every_rule] + [n for n in set_names if n not in SETS]
    if unknown:
        raise SystemExit(f"error: unknown rule or feature set: {', '.join(unknown)}")
    rules = {name: every_rule[name] for name in rule_names}
    sets = {name: SETS[name] for name in set_names}
    cands = candidates(Path(args.work) / "labels.db")
    path = resolve_model_path(args.model)
    tokenizer, model = load_tokenizer(path), load_base_model(path).eval()
    trunk = getattr(model, model.base_model_prefix)
    texts = sorted({(p, r) for p, rs in cands.items() for r in rs})
    index = {t: i for i, t in enumerate(texts)}
    seqs, lengths = encode_for_reward(tokenizer, [t[0] for t in texts], [t[1] for t in texts], args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hidden = trunk.config.hidden_size
    start, rows = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, len(seqs), 16):
            ids, mask = pad_right(seqs[i : i + 16], pad)
            response = response_tail_mask(mask, [n + 1 for n in lengths[i : i + 16]])
            with block_range(trunk, 0, args.trunk_layers, final_norm=True):  # as reward.pooling.pooled_hidden
                states = decode(trunk, mask, input_ids=ids)  # (B, T, H), once for both state poolings
            mean_max = embedding_features(trunk, ids, mask, "response", response)  # [mean ; max over the response]
            max_row = embedding_features(trunk, ids, mask, "response", mask)[:, hidden:]
            prompt_mean = embedding_features(trunk, ids, mask * (1 - response), "last_mean_embeddings")
            response_mean = embedding_features(trunk, ids, response, "last_mean_embeddings")
            rows.append(torch.cat([pool(states, mask, "last_mean"), mean_max, max_row,
                                   pool(states, mask, "last_response_mean", response),
                                   prompt_mean * response_mean, prompt_mean * mean_max[:, hidden:],
                                   coverage(trunk, ids, mask, response),
                                   response_sum(pool(states, mask, "last"), pool(states, mask, "last_response_mean",
                                                response), response),
                                   response_mean * response.sum(-1, keepdim=True)], -1))
    features = torch.cat(rows)  # (N, 10H)
    record = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), "load_avg_before": round(os.getloadavg()[0], 2), "commit": git_commit(),
              "command": " ".join(sys.argv), "responses": len(texts),
              "feature_seconds": round(time.perf_counter() - start, 1), "rules": {}}
    for name, rule in rules.items():
        train, test = split_pairs(labelled_pairs(cands, rule), args.seed, args.test_fraction, args.max_train_pairs)
        per_set = {}
        for key, parts in sets.items():
            columns = [p * hidden + j for p in parts for j in range(hidden)]
            per_set[key] = probe_pairs(features[:, columns], index, train, test)
            print(name, key, per_set[key], flush=True)
        record["rules"][name] = {"train_pairs": len(train), "test_pairs": len(test), "sets": per_set}
    record["load_avg_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
