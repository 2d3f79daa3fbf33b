"""The Flax (linen) twin of the Transformer (encoder-decoder, encoder-only, decoder-only). Never imports torch."""

from jax_tx.attention import MultiHeadAttention
from jax_tx.decoding import generate
from jax_tx.embeddings import PositionalEncoding, TokenEmbedding
from jax_tx.feed_forward import FeedForward
from jax_tx.layers import DecoderLayer, EncoderLayer
from jax_tx.model import Decoder, DecoderOnly, Encoder, EncoderOnly, Generator, Transformer, model_for

__all__ = ["generate", "MultiHeadAttention", "PositionalEncoding", "TokenEmbedding", "FeedForward", "EncoderLayer",
           "DecoderLayer", "Encoder", "Decoder", "Generator", "Transformer", "EncoderOnly",
           "DecoderOnly", "model_for"]
