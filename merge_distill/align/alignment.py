"""Aligning one row of student tokens with a teacher's tokens of the same text, through bytes.

The student's row is a byte string (the bytes of its tokens, `TokenBytes`); the teacher
tokenizes that text itself. Student position t predicts student token t + 1; teacher position j
predicts teacher token j + 1. They correspond where those next tokens start at the same byte:
from there on both predict the same text, each in its own vocabulary. The match is one pass
over each sequence (a dict from byte offset to teacher position), linear in the row's length.

The text is the bytes of the student's tokens: for a SentencePiece student that includes the
dummy space it puts before a document's first word (the teacher then reads " def" for "def"; a
byte-level teacher spells the same bytes, a SentencePiece one adds no second space).

Special tokens in the row (EOS between packed documents) are boundaries: see `align_row`.

A packed row may begin or end inside a multi-byte UTF-8 character (a byte-level token can hold
part of one). Those edge bytes are not text a teacher can read: the teacher sees the row's text
without them, and student positions whose next token starts there stay unaligned (-1).
"""

from __future__ import annotations

import re

from dataclasses import dataclass

from merge_distill.align.token_bytes import TokenBytes, special_counterparts


@dataclass
class RowAlignment:
    """One row's alignment with one teacher.

    teacher_ids: the teacher's tokens of the row's text, its special tokens (BOS) included.
    to_teacher: per student position t (len T): the teacher position j whose next token starts at
        the byte where student token t + 1 starts, or -1.
    student_next_bytes: per student position, the byte length of student token t + 1 (0 if none).
    teacher_next_bytes: per teacher position, the byte length of teacher token j + 1 (0 if none).
    text_bytes: bytes of the row's text the teacher read (the row's bytes less broken edges).
    """

    teacher_ids: list[int]
    to_teacher: list[int]
    student_next_bytes: list[int]
    teacher_next_bytes: list[int]
    text_bytes: int

    @property
    def covered(self) -> int:
        return sum(j >= 0 for j in self.to_teacher)


UTF8_RUN = re.compile("[^\udc80-\udcff]+")  # a run of characters, none an escaped invalid byte


def text_segments(data: bytes) -> list[tuple[int, str]]:
    """The UTF-8 text inside `data` as (byte offset, text) segments, in order. Bytes that are no
    UTF-8 (a character cut at a row's edge; in the middle, only in a student's own samples, which
    may put byte tokens in any order) belong to no segment: no teacher token starts there, so the
    student positions that predict them are not covered."""
    try:
        return [(0, data.decode("utf-8"))]  # every data row but a cut character at an edge
    except UnicodeDecodeError:
        pass
    decoded = data.decode("utf-8", errors="surrogateescape")  # each invalid byte -> one lone surrogate
    segments, char_at, byte_at = [], 0, 0
    for run in UTF8_RUN.finditer(decoded):
        byte_at += len(decoded[char_at: run.start()].encode("utf-8", errors="surrogateescape"))
        segments.append((byte_at, run.group()))
        char_at = run.start()
    return segments


def spans(pieces: list[bytes]) -> list[int]:
    """Start byte of every piece in their concatenation."""
    starts, position = [], 0
    for piece in pieces:
        starts.append(position)
        position += len(piece)
    return starts


def align_row(student_ids: list[int], student: TokenBytes, teacher: TokenBytes,
              counterparts: dict[int, int] | None = None) -> RowAlignment:
    """The alignment of one unpadded row of student ids with `teacher`'s tokens of its text.

    The row is cut at the student's special tokens (documents packed into one row are separated by
    EOS): the teacher encodes each run of text on its own and gets, for each student special token,
    its counterpart (`special_counterparts`: same role or name; none: dropped). A document start
    (the row's start, and text after an EOS) gets what the teacher puts before a text of its own
    (its BOS). So a teacher sees the row as its own packed documents, and where the student
    predicts EOS, the teacher position that predicts its own EOS at the same byte answers.
    `counterparts` (student id -> teacher id) is computed when not given."""
    if counterparts is None:
        counterparts = special_counterparts(student, teacher)
    pieces = student(student_ids)
    starts = spans(pieces)
    T = len(student_ids)
    teacher_ids: list[int] = []
    teacher_pieces: list[bytes] = []
    teacher_starts: list[int] = []  # byte offset in the row of each teacher token
    text_bytes = 0
    document_start = True
    t = 0
    while t < T:
        if not pieces[t]:  # a special token: its counterpart, if the teacher has one
            if student_ids[t] in counterparts:
                teacher_ids.append(counterparts[student_ids[t]])
                teacher_pieces.append(b"")
                teacher_starts.append(starts[t])
            document_start = document_start or student_ids[t] == student.tokenizer.eos_token_id
            t += 1
            continue
        end = t
        while end < T and pieces[end]:
            end += 1
        for lead, text in text_segments(b"".join(pieces[t:end])):
            if document_start and teacher.prefix and teacher_ids[-len(teacher.prefix):] != teacher.prefix:
                teacher_ids += teacher.prefix
                teacher_pieces += [b""] * len(teacher.prefix)
                teacher_starts += [starts[t] + lead] * len(teacher.prefix)
            ids, encoded = teacher.encode(text, special_tokens=False)
            teacher_ids += ids
            teacher_pieces += encoded
            teacher_starts += [starts[t] + lead + offset for offset in spans(encoded)]
            text_bytes += sum(len(p) for p in encoded)
            document_start = False
        t = end
    if not teacher_ids:  # no text at all: one token so that the teacher has an input
        teacher_ids, teacher_pieces, teacher_starts = teacher.prefix[:1] or [teacher.pad_id], [b""], [0]
    # byte offset (in the row) -> teacher position whose next token starts there; special tokens
    # spell no text and are found by (offset, id) instead
    next_at: dict[int, int] = {}
    special_at: dict[tuple[int, int], int] = {}
    for j in range(len(teacher_ids) - 1):
        if teacher_pieces[j + 1]:
            next_at.setdefault(teacher_starts[j + 1], j)
        else:
            special_at.setdefault((teacher_starts[j + 1], teacher_ids[j + 1]), j)
    to_teacher = [-1] * T
    student_next = [0] * T
    for t in range(T - 1):
        if pieces[t + 1]:
            student_next[t] = len(pieces[t + 1])
            to_teacher[t] = next_at.get(starts[t + 1], -1)
        elif student_ids[t + 1] in counterparts:
            to_teacher[t] = special_at.get((starts[t + 1], counterparts[student_ids[t + 1]]), -1)
    teacher_next = [len(teacher_pieces[j + 1]) for j in range(len(teacher_ids) - 1)] + [0]
    return RowAlignment(teacher_ids, to_teacher, student_next, teacher_next, text_bytes)
