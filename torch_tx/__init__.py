"""The PyTorch twin of the Transformer (encoder-decoder, encoder-only, decoder-only). Never imports jax."""

from torch_tx.attention import MultiHeadAttention
from torch_tx.decoding import generate
from torch_tx.embeddings import PositionalEncoding, TokenEmbedding
from torch_tx.feed_forward import FeedForward
from torch_tx.layers import DecoderLayer, EncoderLayer
from torch_tx.model import Decoder, DecoderOnly, Encoder, EncoderOnly, Transformer, model_for

__all__ = ["generate", "MultiHeadAttention", "PositionalEncoding", "TokenEmbedding", "FeedForward", "EncoderLayer",
           "DecoderLayer", "Encoder", "Decoder", "Transformer", "EncoderOnly", "DecoderOnly", "model_for"]
