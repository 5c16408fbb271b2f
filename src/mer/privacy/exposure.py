"""What the server learns: every field of every Flower message, and who sees it per privacy mode.

One table, used by README's privacy section and written into the privacy audit's report
(``mer.experiments.privacy_audit``); the tests check the code against it
(``tests/privacy/test_server_view.py``: an attacker that holds every message the server
received over a protected run cannot tell a lab's counts, AU counts or test labels from
another lab's with the same sums).

Cells: ``server`` (the server reads this lab's own value), ``sum`` (the server gets only the
sum over at least ``privacy.min_clients`` labs: the field travels inside the protected
vector), ``not sent``, ``opt-in`` (sent only with ``privacy.disclose_per_lab=true``), ``n/a``
(the mode refuses the feature). Other labs never receive a lab's message, except what the
column notes name.
"""

from __future__ import annotations

MODES = ("none", "dp", "secagg", "ckks")

# (message type, field, what it is, {mode: who sees it}, other labs)
FIELDS: tuple[tuple[str, str, str, dict[str, str], str], ...] = (
    ("query", "name, index, clients", "the lab's client name and the names its config makes",
     dict.fromkeys(MODES, "server"), "-"),
    ("query", "class-names, input-shape, synthetic", "the label scheme and flow settings",
     dict.fromkeys(MODES, "server"), "-"),
    ("query", "train, test, subjects", "the lab's example and subject counts",
     {"none": "server", "dp": "server", "secagg": "not sent (N in the train sum)",
      "ckks": "not sent (N in the train sum)"}, "-"),
    ("query", "test-database, test-subject, test-clip, test-label",
     "the ids and labels of the lab's test clips",
     {"none": "server", "dp": "server", "secagg": "not sent", "ckks": "not sent"}, "-"),
    ("query", "au-counts", "AU co-occurrence counts of the training split (DPK-GAT's prior)",
     {"none": "server", "dp": "server", "secagg": "not sent", "ckks": "not sent"}, "-"),
    ("query.secure_counts", "secure.payload", "the protected AU co-occurrence counts",
     {"none": "not sent", "dp": "not sent", "secagg": "sum", "ckks": "sum"}, "-"),
    ("train", "arrays", "the lab's locally trained model",
     {"none": "server", "dp": "server (DP-SGD: clipped, noised)", "secagg": "not sent",
      "ckks": "not sent"}, "-"),
    ("train", "metrics.num-examples", "the lab's training-set size n",
     {"none": "server", "dp": "server", "secagg": "sum (N)", "ckks": "sum (N)"}, "-"),
    ("train", "metrics.steps, metrics.seconds", "optimiser steps (reveal n), training time",
     {"none": "server", "dp": "server", "secagg": "not sent", "ckks": "not sent"}, "-"),
    ("train", "metrics.work", "the straggler share the run's fault plan set",
     dict.fromkeys(MODES, "server"), "-"),
    ("train", "secure.payload", "the protected [n w, n]",
     {"none": "not sent", "dp": "not sent", "secagg": "sum", "ckks": "sum"}, "-"),
    ("train", "secure.late, secure.excluded", "the lab held its update back (deadline, "
     "non-finite)", {"none": "n/a", "dp": "n/a", "secagg": "server", "ckks": "server"}, "-"),
    ("train", "control_delta", "SCAFFOLD's control update",
     {"none": "server", "dp": "n/a", "secagg": "n/a", "ckks": "n/a"}, "-"),
    ("train", "privacy.history", "the lab's DP-SGD accountant (sigma, q, steps)",
     {"none": "n/a", "dp": "server (q reveals about n)", "secagg": "n/a", "ckks": "n/a"}, "-"),
    ("evaluate", "probs", "class probabilities of every test clip",
     {"none": "server", "dp": "server", "secagg": "not sent", "ckks": "not sent"}, "-"),
    ("evaluate", "secure.payload", "the protected confusion matrices (one per model kind)",
     {"none": "not sent", "dp": "not sent", "secagg": "sum", "ckks": "sum"}, "-"),
    ("evaluate", "confusion", "the lab's own confusion matrices (per-lab results)",
     {"none": "not sent (probs)", "dp": "not sent (probs)", "secagg": "opt-in",
      "ckks": "opt-in"}, "-"),
    ("query.secure_keys", "secure.c-pk, secure.s-pk", "the lab's two public keys",
     {"none": "not sent", "dp": "not sent", "secagg": "server", "ckks": "not sent"},
     "relayed to the round's labs"),
    ("query.secure_shares", "secure.<lab>", "Shamir shares encrypted for each other lab",
     {"none": "not sent", "dp": "not sent", "secagg": "server (cannot read)",
      "ckks": "not sent"}, "each lab reads its own share"),
    ("query.secure_unmask", "b, s", "shares of survivors' self-mask seeds / dropped labs' keys",
     {"none": "not sent", "dp": "not sent", "secagg": "server (never both for one lab)",
      "ckks": "not sent"}, "-"),
    ("query.secure_finish", "mean, sum", "the released aggregate (decrypted by a key holder)",
     {"none": "not sent", "dp": "not sent", "secagg": "labs in the round",
      "ckks": "server and labs"}, "the round's labs"),
)

# (what, how to switch it off)
STILL_DISCLOSED: tuple[tuple[str, str], ...] = (
    ("the labs' client names (the partition's names, e.g. database names) and node ids",
     "name the labs neutrally in their SuperNodes' node config (client-name) and the "
     "partition; mer does not pseudonymise them"),
    ("round participation: who was selected, replied, failed, dropped, was late or excluded",
     "not switchable: the server must know whose input is in a sum to open it"),
    ("timing: when each reply arrives (a proxy for n and hardware)",
     "not switchable in mer (the reported seconds and steps are not sent under secagg/ckks)"),
    ("the released sums: the global model, N = sum of n, the summed AU counts and the pooled "
     "confusion matrices (a sum of >= privacy.min_clients labs)",
     "raise privacy.min_clients; add DP to what is released (central_dp clips plaintext "
     "updates at the server, so it does not combine with secure aggregation here)"),
    ("per-lab results (each lab's confusion matrices)",
     "off by default: privacy.disclose_per_lab=false"),
    ("under ckks, every lab holds the secret key: a lab colluding with the server can "
     "decrypt another lab's payload", "use privacy=secagg (up to t - 1 colluding labs)"),
)


def markdown_table() -> str:
    """The table of every message field and who sees it, as Markdown."""
    lines = ["| message | field | what | " + " | ".join(MODES) + " | other labs |",
             "|" + "---|" * (len(MODES) + 4)]
    for kind, field, what, who, others in FIELDS:
        lines.append(f"| `{kind}` | `{field}` | {what} | "
                     + " | ".join(who[m] for m in MODES) + f" | {others} |")
    lines += ["", "Still disclosed under secagg / ckks, and how to switch it off:", ""]
    lines += [f"- {what}: {how}" for what, how in STILL_DISCLOSED]
    return "\n".join(lines) + "\n"


def as_records() -> list[dict]:
    """The table as JSON-ready rows (the audit's report)."""
    return [{"message": kind, "field": field, "what": what, **who, "other_labs": others}
            for kind, field, what, who, others in FIELDS]
