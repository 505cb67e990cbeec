"""What a user of `trace apply` and `trace eval` reads when an option or an input is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from cli_runner import invoke

ROOT = Path(__file__).resolve().parents[1]
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"


def test_data_format_hint_names_real_option(tiny_model_dir, tmp_path):
    # The hint of a malformed row must name an option every data command accepts: in trace eval
    # --format chooses the output, so a hint saying --format sent users to the wrong option.
    rows = [json.loads(line) for line in PKU_DATA.read_text().splitlines()[:3]]
    data = tmp_path / "pku.json"
    data.write_text(json.dumps(rows))

    for args in (
        ["apply", str(PKU_POLICY), "-m", str(tiny_model_dir), "-d", str(data), "-o", str(tmp_path / "run"), "--data-format", "hh-rlhf"],
        ["triage", str(PKU_POLICY), "--data", str(data), "-o", str(tmp_path / "t.jsonl"), "--data-format", "hh-rlhf"],
    ):
        result = invoke(args)
        assert result.exit_code == 1
        assert "field 'chosen'" in result.output
        assert "--data-format to read another format" in result.output
