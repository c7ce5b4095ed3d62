"""The README's field reference is generated from the model and kept in sync."""

from pathlib import Path

from kubetrain.docgen.fields import BEGIN, END, field_reference, sync_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_field_reference_is_fresh() -> None:
    text = README.read_text()
    assert sync_readme(text) == text, "README field reference is stale: run `make docs`"


def test_reference_lists_every_stage_field() -> None:
    ref = field_reference()
    assert ref.startswith(BEGIN) and END in ref
    for field in (
        "spec.stages[].hyperparameters.beta",
        "spec.storage.s3.credentialsSecret",
        "spec.budget.maxCostUSD",
        "spec.model.from",
        "status.totals.costUSD",
    ):
        assert f"`{field}`" in ref, field
