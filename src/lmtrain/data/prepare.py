"""Turn a data source into token arrays with a given (or freshly trained) tokenizer."""

from __future__ import annotations

import numpy as np

from lmtrain.config import TrainingConfig
from lmtrain.data.dataset import TokenData, token_dtype
from lmtrain.data.sources import read_corpus
from lmtrain.data.tokenizers import Tokenizer, train_tokenizer


def load_token_data(
    config: TrainingConfig, tokenizer: Tokenizer | None = None,
) -> tuple[Tokenizer, TokenData]:
    """Tokenize ``TRAINING_DATA_SOURCE``; train the tokenizer first when none is given."""
    text = read_corpus(config.training_data_source, config.text_field)
    if tokenizer is None:
        cut = int(len(text) * config.train_split)
        sample = text if config.tokenization_method == "character" else text[:cut]
        tokenizer = train_tokenizer(config.tokenization_method, [sample], config.custom_vocab_size)
    tokens = np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))
    return tokenizer, TokenData.split(
        tokens, config.train_split, config.block_size, config.training_data_source)
