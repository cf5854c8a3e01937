"""Person re-identification: datasets, features, CMC/mAP, re-ranking and ranking attacks."""
