import numpy as np
import pandas as pd
import pytest

from mer.data.aus import PSYAU_AUS, multi_hot, parse_au_string


@pytest.mark.parametrize("text,aus", [
    ("4+7", (4, 7)), ("R12", (12,)), ("L1+2", (1, 2)), ("A1+2", (1, 2)), ("4,7", (4, 7)),
    ("12(k)", (12,)), ("7B", (7,)), ("4A/B", (4,)), ("L12C", (12,)), ("T18", (18,)),
    ("ref(24)", (24,)), (12, (12,)), (12.0, (12,)), ("AU4+AU7", (4, 7)),
    ("L10+25+R26", (10, 25, 26)), ("1+2+1", (1, 2)),
])
def test_parse_known_forms(text, aus):
    parsed = parse_au_string(text)
    assert parsed.aus == aus
    assert parsed.unknown == ()


@pytest.mark.parametrize("text", ["soft focus", "?", "4+blink"])
def test_unknown_tokens_are_reported(text):
    parsed = parse_au_string(text)
    assert parsed.unknown, f"{text!r} should report an unknown token"
    assert parsed.raw == text


def test_missing_cell_is_empty():
    assert parse_au_string(float("nan")).aus == ()
    assert parse_au_string(None).raw == ""


def test_multi_hot_over_declared_list():
    v = multi_hot((1, 12, 25), PSYAU_AUS)
    assert v.shape == (12,)
    assert v[PSYAU_AUS.index(1)] == 1 and v[PSYAU_AUS.index(12)] == 1 and v.sum() == 2


@pytest.mark.parametrize("text,aus,unknown", [
    ("R14+17+soft focus", (14, 17), ("soft focus",)), ("?", (), ("?",)),
    ("(R6 or R12) + R15", (6, 12, 15), ()), ("R14A or 17A or 24A", (14, 17, 24), ()),
    ("A/L12", (12,), ()), ("ref(L10)+A12B", (10, 12), ()), ("B23", (23,), ()),
    ("AU12(k)+AU6'", (12, 6), ()), ("4D+ref(6)+7C+43E", (4, 6, 7, 43), ()),
])
def test_real_sheet_forms(text, aus, unknown):
    parsed = parse_au_string(text)
    assert (parsed.aus, parsed.unknown) == (aus, unknown)


@pytest.mark.parametrize("sheet,column,unknown_by_row", [
    ("CASME2-coding.xlsx", "Action Units", {}),
    ("SAMM-coding.xlsx", "Action Units", {122: ("soft focus",)}),
    ("cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", "AU", {}),
])
def test_every_au_string_in_real_sheets_parses(annotation_sheet, sheet, column, unknown_by_row):
    df = pd.read_excel(annotation_sheet(sheet))
    unknown, empty = {}, []
    for i, cell in enumerate(df[column]):
        parsed = parse_au_string(cell)
        if parsed.unknown:
            unknown[i + 2] = parsed.unknown
        if not parsed.aus:
            empty.append(i + 2)
    assert unknown == unknown_by_row  # sheet row -> tokens that are not AUs
    assert empty == []  # every cell yields at least one AU


@pytest.mark.parametrize("value,invalid", [
    (-4, ("-4",)), (1000, ("1000",)), (0, ("0",)), (4.5, ("4.5",)), (float("inf"), ("inf",)),
    (True, ("True",)), ("4+AU100", ("100",)), ("-4", ("-4",)), ("R0+12", ("0",)),
    ("12+4.5", ("4.5",)),
])
def test_numbers_outside_facs_are_invalid_not_aus(value, invalid):
    """Numeric cells -4 and 1000 were parsed as AUs (an Excel TRUE as AU 1)."""
    parsed = parse_au_string(value)
    assert parsed.invalid == invalid
    assert all(1 <= au <= 99 for au in parsed.aus) and parsed.unknown == ()


@pytest.mark.parametrize("value,aus", [(1, (1,)), (99, (99,)), ("AU99", (99,)), ("12.0", (12,)),
                                       (np.int64(7), (7,)), ("R1+L99B", (1, 99))])
def test_facs_range_bounds(value, aus):
    parsed = parse_au_string(value)
    assert (parsed.aus, parsed.invalid) == (aus, ())
