from __future__ import annotations

from sdstudio.train.analyse import analyse
from sdstudio.train.shapes import ShapesDataset, draw, held_out, write_dataset


def test_dataset_generation_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", count=5, seed=7)
    b = write_dataset(tmp_path / "b", count=5, seed=7)
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes()
    assert (a / "000003.txt").read_text().startswith("a ")


def test_captions_describe_the_picture():
    data = ShapesDataset(seed=1)
    spec, caption = data.spec(0)
    assert f"{spec.colour} {spec.shape}" in caption and caption.endswith(f"on a {spec.background} background")


def test_held_out_combinations_never_appear_in_training():
    data, banned = ShapesDataset(seed=2), held_out()
    assert len(banned) == 24
    assert not any((s.shape, s.colour, s.background) in banned for s, _ in map(data.spec, range(3000)))


def test_analyser_reads_ground_truth_pictures_perfectly():
    data = ShapesDataset(seed=9, exclude_held_out=False)
    for i in range(400):
        spec, _ = data.spec(i)
        a = analyse(draw(spec))
        assert (a.background, a.colour, a.position, a.shape) == (spec.background, spec.colour, spec.position,
                                                                  spec.shape), spec
