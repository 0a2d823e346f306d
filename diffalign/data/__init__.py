"""Preference data: Pick-a-Pic parquet / hub / WebDataset, JSONL pairs, KTO feedback, image
preparation and the on-disk latent and text-embedding cache."""

from diffalign.data.cache import LatentCache
from diffalign.data.dataset import PreferenceDataset, collate_pairs
from diffalign.data.jsonl import read_jsonl_pairs
from diffalign.data.kto import FeedbackSample, feedback_from_pairs, read_feedback
from diffalign.data.pairs import DataStats, EncodedImage, PreferencePair
from diffalign.data.pickapic import read_pickapic, write_pickapic_parquet
from diffalign.data.transforms import (
    Placement,
    PreparedImage,
    place_image,
    place_pair,
    prepare_image,
    prepare_pair,
)

__all__ = [
    "DataStats", "EncodedImage", "FeedbackSample", "LatentCache", "Placement", "PreferenceDataset", "PreferencePair",
    "PreparedImage", "collate_pairs", "feedback_from_pairs", "place_image", "place_pair", "prepare_image",
    "prepare_pair", "read_feedback", "read_jsonl_pairs", "read_pickapic", "write_pickapic_parquet",
]
