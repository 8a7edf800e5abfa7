"""Data: tokenizers, corpus preparation into token shards, the embedded corpus, the loader.

`ensure_prepared` resolves a run's `data` config to a `Manifest`: "embedded", a directory
prepared by `python -m jaxpt.data.prepare` (or `prepare_dataset`), a directory of llm.c `.bin`
or `.npy` shards, or a Hugging Face hub name, prepared into the cache on first use as far as
the run reads (`tokens_needed`). `Loader` reads batches from it. Conversations prepared
with `--format=chat` (`encode_chat`, `chat_prompt`) carry a loss mask (`MaskedBatch`).
"""

from jaxpt.data._chat import CHATML as CHATML
from jaxpt.data._chat import chat_prompt as chat_prompt
from jaxpt.data._chat import chat_template as chat_template
from jaxpt.data._chat import check_messages as check_messages
from jaxpt.data._chat import encode_chat as encode_chat
from jaxpt.data._chat import end_of_turn as end_of_turn
from jaxpt.data._chat import reply_in as reply_in
from jaxpt.data._embedded import EMBEDDED as EMBEDDED
from jaxpt.data._embedded import embedded_documents as embedded_documents
from jaxpt.data._embedded import prepare_embedded as prepare_embedded
from jaxpt.data._hub import HubUnreachableError as HubUnreachableError
from jaxpt.data._hub import hub_or_cache as hub_or_cache
from jaxpt.data._loader import Loader as Loader
from jaxpt.data._loader import LoaderState as LoaderState
from jaxpt.data._loader import MaskedBatch as MaskedBatch
from jaxpt.data._loader import TokenNeed as TokenNeed
from jaxpt.data._loader import check_batches as check_batches
from jaxpt.data._loader import check_vocab as check_vocab
from jaxpt.data._loader import missing_split as missing_split
from jaxpt.data._loader import process_rows as process_rows
from jaxpt.data._loader import to_global as to_global
from jaxpt.data._loader import tokens_needed as tokens_needed
from jaxpt.data._lock import lock_beside as lock_beside
from jaxpt.data._prepare import DEFAULT_DATASET as DEFAULT_DATASET
from jaxpt.data._prepare import prepare_dataset as prepare_dataset
from jaxpt.data._resolve import DataConfig as DataConfig
from jaxpt.data._resolve import default_cache_dir as default_cache_dir
from jaxpt.data._resolve import ensure_prepared as ensure_prepared
from jaxpt.data._resolve import run_tokenizer as run_tokenizer
from jaxpt.data._shards import Manifest as Manifest
from jaxpt.data._shards import Shard as Shard
from jaxpt.data._shards import load_manifest as load_manifest
from jaxpt.data._shards import open_shard as open_shard
from jaxpt.data._shards import save_manifest as save_manifest
from jaxpt.data._shards import write_shard as write_shard
from jaxpt.data._tokenizers import EOT as EOT
from jaxpt.data._tokenizers import CharTokenizer as CharTokenizer
from jaxpt.data._tokenizers import Gpt2Tokenizer as Gpt2Tokenizer
from jaxpt.data._tokenizers import HFTokenizer as HFTokenizer
from jaxpt.data._tokenizers import Tokenizer as Tokenizer
from jaxpt.data._tokenizers import bos_id as bos_id
from jaxpt.data._tokenizers import get_tokenizer as get_tokenizer
from jaxpt.data._tokenizers import same_vocabulary as same_vocabulary
from jaxpt.data._tokenizers import seed_tiktoken_cache as seed_tiktoken_cache
from jaxpt.data._tokenizers import tokenizer_for as tokenizer_for
from jaxpt.data._tokenizers import transformers_ids as transformers_ids
from jaxpt.data._tokenizers import transformers_text as transformers_text
from jaxpt.errors import DataError as DataError
from jaxpt.errors import DataNotFoundError as DataNotFoundError
