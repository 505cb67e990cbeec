"""PKU-SafeRLHF native rows: two responses with safety labels, turned into old-policy pairs.

A row contains `prompt`, `response_0`, `response_1`, a safety flag, 19 harm-category flags and a
severity level per response, and `better_response_id` (helpfulness) and `safer_response_id`
(harmlessness). Old-policy pairs are built as in the PKU-SafeRLHF setting of "The Realignment
Problem: When Right becomes Wrong in LLMs" (arXiv 2511.02623):

- a row without a valid `safer_response_id` (0 or 1) is skipped, and the skip is reported;
- one safe and one unsafe response: the safe one is chosen;
- both safe or both unsafe: the response named by `safer_response_id` is chosen.

Metadata kept for policies (names are stable; policies refer to them):

per response (`chosen_metadata`, `rejected_metadata`):
    `response_id` (int, 0 or 1): which of `response_0` / `response_1` it was.
    `is_safe` (bool): the dataset's safety flag.
    `harm_categories` (list of str): names of the harm categories flagged true, in the dataset's
        order and spelling (see `PKU_HARM_CATEGORIES`); empty for a safe response.
    `severity_level` (int, 0 to 3): 0 safe, 1 minor, 2 moderate, 3 severe.
    `source` (str): the model that wrote the response.

per pair (`metadata`):
    `prompt_source` (str): where the prompt came from.
    `better_response_id` (int, 0 or 1): the more helpful response.
    `safer_response_id` (int, 0 or 1): the more harmless response.
    `chosen_response_id` (int, 0 or 1): which response became `chosen`.
    `chosen_by` (str): 'is_safe' when the safety flags differ and decided, 'safer_response_id'
        when both responses share a flag.

Releases before v1 (PKU-SafeRLHF-30K) lack categories, severity and sources; those keys are then
absent rather than filled with guesses. Row checksums (`response_N_sha256`) are not kept.
"""

from __future__ import annotations

from typing import Any, Mapping

from trace_dsl.data.formats.base import RowError, RowFormat, RowResult, SkipRow, require, require_text, type_name
from trace_dsl.data.records import PreferencePair

# The 19 harm categories (S1 to S19) in the order of the dataset card.
PKU_HARM_CATEGORIES = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)


def _is_response_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in (0, 1)


def _require_bool(row: Mapping[str, Any], field: str) -> bool:
    value = require(row, field)
    if not isinstance(value, bool):
        raise RowError(field, f"expected true or false, got {type_name(value)}", reason_code="wrong-type")
    return value


def _response_metadata(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {"response_id": index, "is_safe": _require_bool(row, f"is_response_{index}_safe")}

    categories_field = f"response_{index}_harm_category"
    if row.get(categories_field) is not None:
        flags = row[categories_field]
        if not isinstance(flags, dict):
            raise RowError(
                categories_field, f"expected an object of category names to booleans, got {type_name(flags)}", reason_code="wrong-type"
            )
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise RowError(f"{categories_field}.{name}", f"expected true or false, got {type_name(flag)}", reason_code="wrong-type")
        metadata["harm_categories"] = [name for name, flag in flags.items() if flag]

    severity_field = f"response_{index}_severity_level"
    if row.get(severity_field) is not None:
        severity = row[severity_field]
        if not (isinstance(severity, int) and not isinstance(severity, bool) and 0 <= severity <= 3):
            raise RowError(severity_field, f"expected an integer from 0 to 3, got {severity!r}", reason_code="wrong-type")
        metadata["severity_level"] = severity

    source_field = f"response_{index}_source"
    if row.get(source_field) is not None:
        metadata["source"] = require_text(row, source_field)
    return metadata


def convert_pku_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Build the old-policy pair of one PKU-SafeRLHF row, or skip it when it names no safer response."""
    prompt = require_text(row, "prompt")
    responses = (require_text(row, "response_0"), require_text(row, "response_1"))
    response_metadata = (_response_metadata(row, 0), _response_metadata(row, 1))

    safer = row.get("safer_response_id")
    if not _is_response_id(safer):
        return SkipRow(f"safer_response_id is {safer!r}, expected 0 or 1", "no-safer-response")

    safe_flags = (response_metadata[0]["is_safe"], response_metadata[1]["is_safe"])
    if safe_flags[0] != safe_flags[1]:
        chosen_index = 0 if safe_flags[0] else 1
        chosen_by = "is_safe"
    else:
        chosen_index = safer
        chosen_by = "safer_response_id"
    rejected_index = 1 - chosen_index

    metadata: dict[str, Any] = {}
    if row.get("prompt_source") is not None:
        metadata["prompt_source"] = require_text(row, "prompt_source")
    better = row.get("better_response_id")
    if better is not None:
        if not _is_response_id(better):
            raise RowError("better_response_id", f"expected 0 or 1, got {better!r}", reason_code="wrong-type")
        metadata["better_response_id"] = better
    metadata["safer_response_id"] = safer
    metadata["chosen_response_id"] = chosen_index
    metadata["chosen_by"] = chosen_by

    return PreferencePair.create(
        prompt,
        responses[chosen_index],
        responses[rejected_index],
        metadata=metadata,
        chosen_metadata=response_metadata[chosen_index],
        rejected_metadata=response_metadata[rejected_index],
        source=location,
    )


def _detect(row: Mapping[str, Any]) -> bool:
    return "response_0" in row and "response_1" in row and ("safer_response_id" in row or "is_response_0_safe" in row)


PKU_SAFERLHF = RowFormat(
    name="pku-saferlhf",
    description="PKU-SafeRLHF rows: prompt, response_0/1, safety flags, harm categories, severity, safer_response_id",
    detect=_detect,
    convert=convert_pku_row,
)
