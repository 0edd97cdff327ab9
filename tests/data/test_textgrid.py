import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_lst.data.documents import DocumentError
from megatron_lst.data.textgrid import Interval, TextGridError, read_textgrid, write_textgrid

# Two tiers as MFA writes them (words, then phones), long format.
LONG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 1.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 1.5
        intervals: size = 3
        intervals [1]:
            xmin = 0
            xmax = 0.42
            text = ""
        intervals [2]:
            xmin = 0.42
            xmax = 1.1
            text = "say ""hi"""
        intervals [3]:
            xmin = 1.1
            xmax = 1.5
            text = "world"
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 1.5
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 1.5
            text = "AH0"
'''

# The same grid in Praat's short format, with a point tier first.
SHORT = '''File type = "ooTextFile"
Object class = "TextGrid"

0
1.5
<exists>
2
"TextTier"
"events"
0
1.5
1
0.7
"click"
"IntervalTier"
"words"
0
1.5
3
0
0.42
""
0.42
1.1
"say ""hi"""
1.1
1.5
"world"
'''

EXPECTED = [Interval(0.0, 0.42, ""), Interval(0.42, 1.1, 'say "hi"'), Interval(1.1, 1.5, "world")]


@pytest.mark.parametrize("content", [LONG, SHORT], ids=["long", "short"])
def test_reads_word_tier(tmp_path, content):
    path = tmp_path / "utt.TextGrid"
    path.write_text(content)
    assert read_textgrid(path) == EXPECTED


def test_reads_the_older_short_header(tmp_path):
    """'File type = "ooTextFile short"' then '"TextGrid"' (P2FA, praatio, older Praat) was
    refused as 'not a Praat text file'."""
    path = tmp_path / "utt.TextGrid"
    path.write_text(SHORT.replace('"ooTextFile"', '"ooTextFile short"').replace(
        'Object class = "TextGrid"', '"TextGrid"'))
    assert read_textgrid(path) == EXPECTED


def test_reads_other_tier_and_utf16(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_bytes(LONG.replace("AH0", "é").encode("utf-16"))
    assert read_textgrid(path, tier="phones") == [Interval(0.0, 1.5, "é")]


def test_write_read_round_trip_fills_gaps(tmp_path):
    path = tmp_path / "out.TextGrid"
    words = [Interval(0.2, 0.5, "a"), Interval(0.5, 0.9, 'q"uote'), Interval(1.25, 1.5, "end")]
    write_textgrid(path, words, xmax=2.0)
    back = read_textgrid(path)
    assert [w for w in back if w.label] == words
    assert back[0] == Interval(0.0, 0.2, "")
    assert back[-1] == Interval(1.5, 2.0, "")
    assert all(a.end == b.start for a, b in zip(back, back[1:], strict=False))


def test_write_rejects_overlap(tmp_path):
    with pytest.raises(TextGridError, match="overlaps"):
        write_textgrid(tmp_path / "x.TextGrid", [Interval(0, 1, "a"), Interval(0.5, 2, "b")])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("field", ["start", "end"])
def test_write_refuses_times_the_reader_refuses_naming_the_interval(tmp_path, bad, field):
    """NaN and inf times were written ('nan', 'inf') and a negative start before a first interval
    as is: files read_textgrid then refused. Nothing is written now."""
    path = tmp_path / "x.TextGrid"
    times = {"start": 0.5, "end": 0.9, field: bad}
    words = [Interval(0.0, 0.5, "a"), Interval(times["start"], times["end"], "b"),
             Interval(1.0, 1.2, "c")]
    with pytest.raises(TextGridError, match=rf"x.TextGrid: interval 2 of 3 \(.*'b'\)\) has "
                                            rf"{field} {bad!r}; times must be finite seconds >= 0"):
        write_textgrid(path, words)
    assert not path.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_write_refuses_a_bad_xmax(tmp_path, bad):
    with pytest.raises(TextGridError, match=rf"xmax {bad!r} is not a finite number of seconds"):
        write_textgrid(tmp_path / "x.TextGrid", [Interval(0.0, 0.5, "a")], xmax=bad)
    with pytest.raises(TextGridError, match="xmax"):
        write_textgrid(tmp_path / "x.TextGrid", [], xmax=bad)


def test_missing_tier_lists_tiers(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_text(LONG)
    with pytest.raises(DocumentError, match=r"utt.TextGrid: no tier named 'word'.*'words', 'phones'"):
        read_textgrid(path, tier="word")


@pytest.mark.parametrize("content, line", [
    (LONG.replace('name = "phones"', 'name = "words"'), 29),
    # A third tier, an interval tier named "words" too (after one of one interval).
    (SHORT.replace("<exists>\n2\n", "<exists>\n3\n", 1)
     + '"IntervalTier"\n"words"\n0\n1.5\n1\n0\n1.5\n"x"\n', 30),
], ids=["long", "short"])
def test_a_second_tier_of_the_name_is_refused(tmp_path, content, line):
    """The first tier of the name was read and a second one's words silently left out."""
    path = tmp_path / "x.TextGrid"
    path.write_text(content)
    with pytest.raises(TextGridError, match=rf"x.TextGrid:{line}: a second tier named 'words' "
                                            rf"\(tier [12] has that name too\); .*split the file"):
        read_textgrid(path)


def test_point_tier_is_refused(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_text(SHORT)
    with pytest.raises(TextGridError, match="point tier"):
        read_textgrid(path, tier="events")


def test_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "bad.TextGrid"
    path.write_text(LONG.replace("xmax = 1.1", "xmax = oops", 1))
    with pytest.raises(TextGridError, match=r"bad.TextGrid:21: expected an interval's xmax"):
        read_textgrid(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.TextGrid"
    path.write_text(LONG[: LONG.index("intervals [3]")])
    with pytest.raises(TextGridError, match=r"cut.TextGrid:\d+: file ends"):
        read_textgrid(path)


def test_not_a_textgrid(tmp_path):
    path = tmp_path / "x.TextGrid"
    path.write_text('File type = "ooTextFile"\nObject class = "Sound"\n')
    with pytest.raises(TextGridError, match="x.TextGrid:2: not a TextGrid"):
        read_textgrid(path)


@pytest.mark.parametrize("content, line, message", [
    # the third interval, "world", was left out silently
    (LONG.replace("intervals: size = 3", "intervals: size = 2"), 24,
     "tier 'words' says it holds 2 intervals but more follow"),
    (SHORT.replace('"events"\n0\n1.5\n1\n', '"events"\n0\n1.5\n0\n'), 13,
     "tier 'events' says it holds 0 points but more follow"),
], ids=["intervals", "points"])
def test_a_tier_holding_more_than_its_size_is_refused(tmp_path, content, line, message):
    path = tmp_path / "x.TextGrid"
    path.write_text(content)
    with pytest.raises(TextGridError, match=rf"x.TextGrid:{line}: {message}; fix its size"):
        read_textgrid(path)


def test_a_binary_praat_file_is_named_as_such(tmp_path):
    """It was "expected the file type (string), found 'ooBinaryFile...'", which says neither
    what the file is nor what to do."""
    path = tmp_path / "x.TextGrid"
    path.write_bytes(b"ooBinaryFile\x08TextGrid\x00\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(TextGridError, match=r"x.TextGrid: a binary Praat file \(it starts with "
                                            r"b'ooBinaryFile'\), not a text TextGrid; save it "
                                            r"from Praat with \"Save as text file\""):
        read_textgrid(path)


def test_interval_ending_before_start(tmp_path):
    path = tmp_path / "x.TextGrid"
    path.write_text(LONG.replace("xmax = 0.42", "xmax = -1", 1))
    with pytest.raises(TextGridError, match="x.TextGrid:16: .*ends before it starts"):
        read_textgrid(path)


@pytest.mark.parametrize("old, new, message", [
    ("xmax = 1.1", "xmax = 1e400", r"x.TextGrid:21: an interval's xmax is 1e400, beyond the range"),
    ("intervals: size = 3", "intervals: size = 3e999", r"x.TextGrid:14: the number of intervals "
                                                        r"or points is 3e999, beyond the range"),
])
def test_a_number_beyond_the_float_range_names_its_line(tmp_path, old, new, message):
    path = tmp_path / "x.TextGrid"
    path.write_text(LONG.replace(old, new, 1))
    with pytest.raises(TextGridError, match=message):
        read_textgrid(path)


def _short_with_line(number: int, value: str) -> str:
    lines = SHORT.splitlines()
    lines[number - 1] = value
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("content, message", [
    # The word tier's xmin: the tier's xmax, then the interval count, were read in its place,
    # which gave a tier of 0 intervals without a word.
    (_short_with_line(17, "--undefined--"), r"x.TextGrid:17: expected the tier's xmin \(number\), "
                                            r"found '--undefined--'"),
    (_short_with_line(21, "nan"), r"x.TextGrid:21: expected an interval's xmax \(number\), found "
                                  r"'nan'"),
    (LONG.replace("xmin = 0.42", "xmin = --undefined--"), r"x.TextGrid:20: expected an "
                                                          r"interval's xmin \(number\), found "
                                                          r"'--undefined--'"),
])
def test_an_undefined_or_bare_value_is_named_where_it_stands(tmp_path, content, message):
    """Praat writes an undefined number as --undefined--; it and a bare word on a line of its own
    were passed over, so the next value was read in their place (or the error named another)."""
    path = tmp_path / "x.TextGrid"
    path.write_text(content)
    with pytest.raises(TextGridError, match=message):
        read_textgrid(path)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_is_read(tmp_path, encoding):
    """Was refused as 'expected the file type (string), found '\\x00''."""
    path = tmp_path / "x.TextGrid"
    path.write_bytes(LONG.encode(encoding))
    utf8 = tmp_path / "y.TextGrid"
    utf8.write_text(LONG, encoding="utf-8")
    assert read_textgrid(path) == read_textgrid(utf8)


@pytest.mark.parametrize("raw, message", [
    (LONG.replace('"world"', '"caf\xe9"').encode("latin-1"), r"x.TextGrid:26: not UTF-8 text"),
    (LONG.encode("utf-16")[:-1], r"x.TextGrid:\d+: not UTF-16 text"),
    (LONG.encode("utf-16-le")[:-1], r"x.TextGrid:\d+: not UTF-16 text"),
])
def test_text_in_another_encoding_names_the_file_and_line(tmp_path, raw, message):
    path = tmp_path / "x.TextGrid"
    path.write_bytes(raw)
    with pytest.raises(TextGridError, match=message + r" .*save the TextGrid as UTF-8"):
        read_textgrid(path)


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.text(max_size=8), min_size=1, max_size=6),
       gaps=st.lists(st.floats(0.0, 2.0), min_size=12, max_size=12))
def test_round_trip_any_labels(tmp_path_factory, labels, gaps):
    # Contiguous intervals (as MFA writes them) with arbitrary labels: quotes, brackets, digits,
    # newlines and non-ASCII must all read back exactly.
    times = np.cumsum([0.0] + [g + 0.01 for g in gaps[: len(labels)]]).tolist()
    intervals = [Interval(a, b, label) for a, b, label in zip(times, times[1:], labels,
                                                              strict=False)]
    path = tmp_path_factory.mktemp("tg") / "any.TextGrid"
    write_textgrid(path, intervals)
    assert read_textgrid(path) == intervals
