"""Preference data: Pick-a-Pic parquet / hub / WebDataset, JSONL pairs, KTO feedback, image
preparation and the on-disk latent and text-embedding cache."""

from diffalign.data.cache import LatentCache
from diffalign.data.dataset import PreferenceDataset, collate_pairs
from diffalign.data.jsonl import read_jsonl_pairs
from diffalign.data.kto import FeedbackSample, feedback_from_pairs, read_feedback
from diffalign.data.pairs import DataStats, PreferencePair
from diffalign.data.pickapic import read_pickapic, write_pickapic_parquet
from diffalign.data.transforms import PreparedImage, prepare_image, prepare_pair

__all__ = [
    "DataStats", "FeedbackSample", "LatentCache", "PreferenceDataset", "PreferencePair", "PreparedImage",
    "collate_pairs", "feedback_from_pairs", "prepare_image", "prepare_pair", "read_feedback", "read_jsonl_pairs",
    "read_pickapic", "write_pickapic_parquet",
]
