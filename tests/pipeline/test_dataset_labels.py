"""A dataset's class names against the model's labels: mapped by name, refused when they differ (never compared by
id silently), in evaluation (`evaluate_classifier`) and in calibration with relevance at the label."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_models import IMAGE_SIZE, build, pixels
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessorPil

from optimum_lrpq import LRPQConfig, LRPQuantizer
from optimum_lrpq.data.labels import LabelMismatchError, label_mapping, model_label_names
from optimum_lrpq.demo import MODEL_DIR, load_digits
from optimum_lrpq.metrics.classification import evaluate_classifier
from optimum_lrpq.pipeline.calibration_data import prepare_calibration_data

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Config:
    def __init__(self, id2label):
        self.id2label = id2label


def labelled(names: list[str], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"label": labels}, features=features)


# ---------------------------------------------------------------------------------------------------------------------
# the mapping
# ---------------------------------------------------------------------------------------------------------------------


def test_same_names_in_another_order_are_mapped_by_name():
    model = Config({0: "cat", 1: "dog", 2: "bird"})
    assert label_mapping(labelled(["bird", "Cat ", "dog"], [0]), "label", model) == {0: 2, 1: 0, 2: 1}
    assert label_mapping(labelled(["cat", "dog", "bird"], [0]), "label", model) is None  # same order: ids as they are
    assert label_mapping(labelled(["dog"], [0]), "label", model) == {0: 1}  # a subset of the model's classes


def test_names_that_are_not_model_labels_are_refused_naming_them():
    digits = Config({i: str(i) for i in range(10)})
    folders = sorted(WORDS)  # an image folder numbers its class folders alphabetically
    with pytest.raises(LabelMismatchError) as info:
        label_mapping(labelled(folders, [0]), "label", digits)
    message = str(info.value)
    assert message.startswith("The dataset's class names do not match the model's labels (id2label): 10 of the "
                              "dataset's 10 classes ('eight', 'five', 'four', 'nine', 'one', 'seven' and 4 more) are "
                              "not among the model's 10 labels ('0', '1', '2', '3', '4', '5' and 4 more)")
    assert "Rename the dataset's classes to the model's labels (for an image folder: its class folders)" in message
    assert "cast_column('label', datasets.Value('int64'))" in message
    assert info.value.unmatched == folders and isinstance(info.value, ValueError)
    with pytest.raises(LabelMismatchError, match=r"1 of the dataset's 3 classes \('kangaroo'\) is not among"):
        label_mapping(labelled(["cat", "kangaroo", "dog"], [0]), "label", Config({0: "cat", 1: "dog"}))


def test_unnamed_classes_on_either_side_keep_the_ids():
    placeholders = Config({0: "LABEL_0", 1: "LABEL_1"})  # what transformers writes when no labels were given
    assert model_label_names(placeholders) is None
    assert label_mapping(labelled(["zero", "one"], [0]), "label", placeholders) is None
    plain = datasets.Dataset.from_dict({"label": [0, 1]})  # integers, no class names
    assert label_mapping(plain, "label", Config({0: "cat", 1: "dog"})) is None


def test_a_name_the_model_lists_twice_keeps_its_own_id():
    model = Config({0: "heron", 1: "crane", 2: "stork", 3: "crane"})  # ImageNet's labels name "crane" twice
    assert label_mapping(labelled(["heron", "crane", "stork"], [0]), "label", model) is None
    assert label_mapping(labelled(["crane", "heron"], [0]), "label", model) == {0: 1, 1: 0}  # first of the two


# ---------------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    test = load_digits()["test"].select(range(60))
    return {"model": AutoModelForImageClassification.from_pretrained(MODEL_DIR),
            "processor": AutoImageProcessor.from_pretrained(MODEL_DIR), "digits": test}


def renamed(dataset: datasets.Dataset, names: list[str], new_id) -> datasets.Dataset:
    """The same images with the label column renumbered by `new_id(old id)` and named `names`."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": dataset["image"], "label": [new_id(i) for i in dataset["label"]]},
                                      features=features)


def accuracy(demo, dataset) -> float:
    return evaluate_classifier(demo["model"], dataset, image_processor=demo["processor"], batch_size=30,
                               show_progress=False)["accuracy"]


def test_evaluation_maps_reordered_class_names_to_the_models_ids(demo):
    reference = accuracy(demo, demo["digits"])
    assert reference > 0.9
    reversed_names = [str(9 - i) for i in range(10)]  # class 0 is named "9", ...
    assert accuracy(demo, renamed(demo["digits"], reversed_names, lambda i: 9 - i)) == reference


def test_evaluation_refuses_class_names_that_are_not_the_models_labels(demo):
    folders = sorted(WORDS)
    as_folders = renamed(demo["digits"], folders, lambda i: folders.index(WORDS[i]))
    with pytest.raises(LabelMismatchError, match=r"10 of the dataset's 10 classes \('eight', 'five', 'four'"):
        accuracy(demo, as_folders)


def test_casting_the_labels_to_integers_keeps_the_ids(demo):
    # Names the model does not know, but ids already the model's: the documented way to say so.
    words = renamed(demo["digits"], WORDS, lambda i: i)
    with pytest.raises(LabelMismatchError):
        accuracy(demo, words)
    assert accuracy(demo, words.cast_column("label", datasets.Value("int64"))) == accuracy(demo, demo["digits"])


# ---------------------------------------------------------------------------------------------------------------------
# calibration: only when relevance starts at the label
# ---------------------------------------------------------------------------------------------------------------------


def named_model(names: list[str]):
    model = build("vit")
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return model


def image_dataset(names: list[str], labels: list[int]) -> datasets.Dataset:
    images = [random_image(seed) for seed in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def random_image(seed: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    array = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


PROCESSOR = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
MODEL_NAMES = ["ant", "bee", "cat", "dog", "eel"]


def calibration(model, dataset, need_labels):
    return prepare_calibration_data(dataset, model, num_samples=4, batch_size=4, image_processor=PROCESSOR,
                                    need_labels=need_labels)


def test_calibration_labels_are_mapped_by_name_when_used():
    model = named_model(MODEL_NAMES)
    dataset = image_dataset(["eel", "ant"], [0, 1, 1, 0])  # dataset id 0 is the model's "eel" (4)
    assert calibration(model, dataset, need_labels=True).labels[0].tolist() == [4, 0, 0, 4]
    assert calibration(model, dataset, need_labels=False).labels[0].tolist() == [0, 1, 1, 0]  # unused: as read


def test_calibration_refuses_mismatched_names_only_when_labels_are_used():
    model = named_model(MODEL_NAMES)
    dataset = image_dataset(["ant", "yak"], [0, 1, 0, 1])
    with pytest.raises(LabelMismatchError, match=r"1 of the dataset's 2 classes \('yak'\) is not"):
        calibration(model, dataset, need_labels=True)
    assert calibration(model, dataset, need_labels=False).num_images == 4


def test_quantizing_with_relevance_at_mismatched_labels_is_refused_and_leaves_the_model():
    model = named_model(MODEL_NAMES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LRPQConfig(mixed_precision=True, relevance_target="label", num_calibration_samples=4)
    with pytest.raises(ValueError, match=r"\('yak'\) is not among the model's 5 labels \('ant', 'bee'"):
        LRPQuantizer(config).quantize_model(model, image_dataset(["ant", "yak"], [0, 1, 0, 1]),
                                            image_processor=PROCESSOR, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Relevance at the predicted class reads no labels: the same data is fine.
    config = LRPQConfig(weight_bits=8, activation_bits=8, num_calibration_samples=4)
    LRPQuantizer(config).quantize_model(model, image_dataset(["ant", "yak"], [0, 1, 0, 1]),
                                        image_processor=PROCESSOR, show_progress=False)
    assert torch.isfinite(model(pixel_values=pixels(2)).logits).all()
