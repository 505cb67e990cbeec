"""The compiler: content hash, definitions, and the generated rule function against the
tree-walking evaluator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trace_dsl.compiler.evaluator import EvaluationError
from trace_dsl.compiler.policy import load_policy
from trace_dsl.data.loader import load_pairs
from trace_dsl.data.records import PreferencePair
from trace_dsl.triage.engine import response_contexts

ROOT = Path(__file__).resolve().parent.parent
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"
HH_POLICY = ROOT / "policies" / "hh_clear_refusals.tp"
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"
HH_DATA = ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz"


def write(tmp_path: Path, text: str, name: str = "policy.tp") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_hash_ignores_layout(tmp_path):
    tight = write(tmp_path, 'policy "p" version "1"\nrule R1 "t": violates when response contains "x"\n', "a.tp")
    loose = write(tmp_path, 'policy   "p"\n version "1"\n\nrule R1 "t":\n    violates when   response contains "x"\n', "b.tp")
    assert load_policy(tight).hash == load_policy(loose).hash


def test_hash_follows_content_and_imports(tmp_path):
    (tmp_path / "shared").mkdir()
    write(tmp_path, 'predicate p = response contains "x"\n', "shared/lib.tp")
    path = write(tmp_path, 'policy "p" version "1"\nimport "shared/lib.tp"\nrule R1 "t": violates when p\n')
    first = load_policy(path).hash
    write(tmp_path, 'predicate p = response contains "y"\n', "shared/lib.tp")
    assert load_policy(path).hash != first
    assert len(first) == 64


def test_hash_independent_of_working_directory(tmp_path, monkeypatch):
    path = write(tmp_path, 'policy "p" version "1"\nrule R1 "t": violates when response contains "x"\n')
    here = load_policy(path).hash
    monkeypatch.chdir(tmp_path)
    assert load_policy("policy.tp").hash == here


def test_elements_give_definitions():
    policy = load_policy(PKU_POLICY)
    elements = policy.elements()
    rule = elements["rule:R1"]
    assert rule.title.startswith("No flat refusal")
    assert rule.text.startswith("violates when flat_refusal and educational_request")
    assert rule.uses == {"flat_refusal", "educational_request", "mental_health_topic", "financial_topic",
                         "cybersecurity_topic"}
    assert elements["predicate:refusal"].text.startswith("response matches /(?i)")
    assert elements["let:reduced"].text == '["Copyright Issues", "Economic Crime", "White-Collar Crime"]'
    assert policy.rule_ids == ("C1", "C2", "H1", "H2", "S1", "S2", "S3", "D1", "R1")


def test_model_predicate_definition_excludes_threshold(tmp_path):
    text = 'policy "p" version "1"\npredicate s = embedding(response, examples=["no"]) >= {}\nrule R1 "t": violates when s\n'
    low = load_policy(write(tmp_path, text.format("0.5"), "low.tp"))
    high = load_policy(write(tmp_path, text.format("0.8"), "high.tp"))
    assert low.models["s"].definition == high.models["s"].definition
    assert low.models["s"].test.threshold == 0.5
    assert low.rules[0].models == {"s"}


def test_strings_never_become_code(tmp_path):
    payload = r'\"); import os; os.system(\"touch pwned\") #'
    text = f'policy "p" version "1"\nrule R1 "t": violates when response contains "{payload}"\n'
    policy = load_policy(write(tmp_path, text))
    source = policy.classifier.cheap_source
    assert "os.system" not in source
    chosen, _ = response_contexts(PreferencePair.create("p", 'x"); IMPORT OS; os.system("touch pwned") #', "y"))
    assert policy.classifier.cheap_rules(chosen) == ("R1",)
    assert not (tmp_path / "pwned").exists()


def test_missing_field_is_evaluation_error(tmp_path):
    path = write(tmp_path, 'policy "p" version "1"\nrule R1 "t": violates when response.severity_level >= 2\n')
    policy = load_policy(path)
    chosen, _ = response_contexts(PreferencePair.create("p", "c", "r"))
    with pytest.raises(EvaluationError, match="field `response.severity_level` is missing on the chosen response"):
        policy.classifier.cheap_rules(chosen)


def test_wrong_field_type_is_evaluation_error(tmp_path):
    path = write(tmp_path, 'policy "p" version "1"\nrule R1 "t": violates when response.tags has_any ["a"]\n')
    policy = load_policy(path)
    chosen, _ = response_contexts(PreferencePair.create("p", "c", "r", chosen_metadata={"tags": "a"}))
    with pytest.raises(EvaluationError, match="is string"):
        policy.classifier.cheap_rules(chosen)


def _reference_fired(policy, ctx) -> tuple[str, ...]:
    classifier = policy.classifier
    return tuple(node.id for node in classifier.rule_nodes if classifier.rule_fires(node, ctx) is True)


@pytest.mark.parametrize(
    "policy_path, data_path",
    [(PKU_POLICY, PKU_DATA), (HH_POLICY, HH_DATA)],
    ids=["pku", "hh"],
)
def test_generated_rules_match_evaluator(policy_path, data_path):
    policy = load_policy(policy_path)
    pairs = load_pairs(data_path, skip_invalid=True).pairs
    fired_somewhere = set()
    for pair in pairs:
        for ctx in response_contexts(pair):
            fast = policy.classifier.cheap_rules(ctx)
            assert fast == _reference_fired(policy, ctx), (pair.id, ctx.role)
            fired_somewhere.update(fast)
    # The comparison means something only if most rules fire somewhere in the data.
    assert len(fired_somewhere) >= len(policy.rules) - 1


def test_generated_rules_handle_every_operator(tmp_path):
    text = '''policy "ops" version "1"
let tags = ["a", "b"]
let limit = 3
predicate p1 = response.tags has_all tags or response.tags has_any ["z"]
predicate p2 = pair.source in ["x", "y"] and response.score != 2
predicate p3 = len(response) < 10 and words(prompt) <= limit and response.ok
predicate p4 = response.kind == "k" and not response matches /^B/i
predicate p5 = history contains_all ["hello", "world"] or prompt contains "PLEASE"
rule R1 "one": violates when p1
rule R2 "two": violates when p2 unless p3
rule R3 "three": violates when p3 and p4
rule R4 "four": violates when p5 and (p1 or not p2)
'''
    policy = load_policy(write(tmp_path, text))
    samples = []
    for tags in (["a", "b"], ["a"], ["z"], []):
        for source in ("x", "q"):
            for response in ("short", "Bigger response text"):
                for history in ((), ({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "World"})):
                    samples.append(PreferencePair.create(
                        "please do", response, "r", history=history, metadata={"source": source},
                        chosen_metadata={"tags": tags, "score": len(tags), "ok": bool(tags), "kind": "k"},
                    ))
    seen = set()
    for pair in samples:
        chosen, _ = response_contexts(pair)
        fast = policy.classifier.cheap_rules(chosen)
        assert fast == _reference_fired(policy, chosen)
        seen.add(fast)
    assert len(seen) >= 4
