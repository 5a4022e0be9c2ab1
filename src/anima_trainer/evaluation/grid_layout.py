"""Drawing a labelled image grid with Pillow: a title block, a header row of column labels, a left column of row
labels, and the cells, each centred in a box of one size.  Text is Pillow's default font (FreeType Aileron when
Pillow has FreeType, its bitmap font otherwise) sized from the cell height, so a grid of 512 px cells reads at a
glance and a grid of 64 px test cells stays small.  Pure layout: no model, no file.

    image, layout = draw_grid(cells, row_labels, column_labels, [(prompt, True), (settings, False)],
                              corner="network \\ strength")     # layout.size == image.size
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
HEADER_BACKGROUND = (236, 236, 236)
TEXT = (20, 20, 20)
MUTED_TEXT = (90, 90, 90)
ELLIPSIS = "…"


def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at `size` px (Pillow ≥ 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no sizes
        return ImageFont.load_default()


def _width(font, text: str) -> float:
    return font.getlength(text)


def _break_word(word: str, font, width: float) -> list[str]:
    """A word wider than `width` cut into pieces that fit (file names have no spaces to break at)."""
    pieces, current = [], ""
    for char in word:
        if current and _width(font, current + char) > width:
            pieces.append(current)
            current = char
        else:
            current += char
    return [*pieces, current] if current else pieces


def _fit(text: str, font, width: float) -> str:
    """`text` cut to `width` with an ellipsis (unchanged when it fits)."""
    if _width(font, text) <= width:
        return text
    while text and _width(font, text + ELLIPSIS) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def wrap_text(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px, breaking words that do not fit on a line of their own; beyond `max_lines`
    the last line ends with an ellipsis.  Line breaks in `text` are kept."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if _width(font, candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            pieces = _break_word(word, font, width) or [""]
            lines.extend(pieces[:-1])
            current = pieces[-1]
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + ELLIPSIS, font, width)
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes (px): the label column's width, the title and header heights, the cell box and the
    gap after each cell.  Cell (r, c) is pasted at `cell_origin(r, c)`; the image is `size`."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int
    label_width: int
    title_height: int
    header_height: int
    gap: int
    font_size: int

    @property
    def top(self) -> int:
        """The y of the first cell row: title + header."""
        return self.title_height + self.header_height

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_width + self.columns * (self.cell_width + self.gap),
                self.top + self.rows * (self.cell_height + self.gap))

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return (self.label_width + column * (self.cell_width + self.gap),
                self.top + row * (self.cell_height + self.gap))

    def as_dict(self) -> dict:
        return {**asdict(self), "size": list(self.size)}


def font_size_for(cell_height: int) -> int:
    """Label size from the cell height: 12 px (test cells) up to 28 px (cells of 560 px and more)."""
    return max(12, min(28, cell_height // 20))


def draw_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str],
              title_lines: Sequence[tuple[str, bool]], *, corner: str = "") -> tuple[Image.Image, GridLayout]:
    """The grid image and its layout.  `cells[r][c]`: RGB images no larger than the box (the largest width ×
    the largest height); `title_lines`: (text, emphasised) paragraphs wrapped to the grid's width (an
    emphasised paragraph in the larger font, up to 3 lines; others 1 line)."""
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one row and one column")
    if len(cells) != len(row_labels) or any(len(r) != len(column_labels) for r in cells):
        raise ValueError("cells must be rows × columns, matching the labels")
    cell_w = max(im.width for row in cells for im in row)
    cell_h = max(im.height for row in cells for im in row)
    size = font_size_for(cell_h)
    font, title_font = load_font(size), load_font(size + 4)
    line_h, title_line_h = round(size * 1.3), round((size + 4) * 1.3)
    pad, gap = size // 2, max(2, size // 6)

    natural = max([_width(font, line) for label in (*row_labels, corner) for line in label.split("\n")] or [0])
    label_w = int(min(natural, max(cell_w, 12 * size))) + 2 * pad
    row_lines = [wrap_text(label, font, label_w - 2 * pad, max(1, (cell_h - pad) // line_h)) for label in row_labels]
    column_lines = [wrap_text(label, font, cell_w - 2 * pad, 3) for label in column_labels]
    corner_lines = wrap_text(corner, font, label_w - 2 * pad, 3) if corner else []
    header_h = max(len(lines) for lines in (*column_lines, corner_lines)) * line_h + 2 * pad

    width = label_w + len(column_labels) * (cell_w + gap)
    wrapped_title = [(wrap_text(text, title_font if strong else font, width - 2 * pad, 3 if strong else 1), strong)
                     for text, strong in title_lines]
    title_h = sum(len(lines) * (title_line_h if strong else line_h) for lines, strong in wrapped_title) + 2 * pad
    layout = GridLayout(len(row_labels), len(column_labels), cell_w, cell_h, label_w, title_h, header_h, gap, size)

    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for lines, strong in wrapped_title:
        for line in lines:
            draw.text((pad, y), line, fill=TEXT if strong else MUTED_TEXT, font=title_font if strong else font)
            y += title_line_h if strong else line_h
    draw.rectangle((0, title_h, width - 1, layout.top - 1), fill=HEADER_BACKGROUND)
    for i, line in enumerate(corner_lines):
        draw.text((pad, title_h + pad + i * line_h), line, fill=MUTED_TEXT, font=font)
    for column, lines in enumerate(column_lines):
        x0 = layout.cell_origin(0, column)[0]
        for i, line in enumerate(lines):
            x = x0 + (cell_w - _width(font, line)) / 2
            draw.text((round(x), title_h + pad + i * line_h), line, fill=TEXT, font=font)
    for row, lines in enumerate(row_lines):
        y0 = layout.cell_origin(row, 0)[1]
        for i, line in enumerate(lines):
            draw.text((pad, y0 + pad // 2 + i * line_h), line, fill=TEXT, font=font)
        for column, image in enumerate(cells[row]):
            x, y = layout.cell_origin(row, column)
            canvas.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
    return canvas, layout
