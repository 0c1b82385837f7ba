"""A tiny MiniMax-style tokenizer for test checkpoints: byte-level BPE + MiniMax's special tokens and template."""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .tokenizer import DEFAULT_CHAT_TEMPLATE

# MiniMax's added tokens in id order (model.md §8: ids 200000..200025 in the real tokenizer), then the
# template's document prefix, which the real added-token list does not contain.
SPECIAL_TOKENS = [
    "<pad>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<reponame>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>",
    "<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>", "<function_call>",
    "<code_interpreter>", "<speech>", "<image>", "<begin_of_document>",
]
MIN_VOCAB_SIZE = 300
MODEL_MAX_LENGTH = 40960000

_CORPUS = r'''
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Inference servers batch requests together so that the accelerator stays busy; each request streams its
tokens back to the client as soon as they are sampled. When the model emits the end-of-sentence token,
the server stops generating and returns the finished response with its usage statistics.

In the beginning the weather was calm, and the sailors spent the morning mending their nets. By noon the
wind had turned, clouds gathered over the harbour, and the first drops of rain fell on the wooden deck.
"We should wait until tomorrow," said the captain. "There is no reason to hurry."

Mixture-of-experts models route every token to a few experts out of many. The router computes a score for
each expert, keeps the top two, and normalises their weights. Lightning attention keeps a running state
instead of a growing cache, which makes long contexts cheap: the state is updated with a decay factor at
every position, and the output is the query multiplied by the state.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828 -17 +5 1e-5 2026-11-27
12:30:45 $19.99 50% #1 @user x^2 + y^2 = z^2 a*b/c (parentheses) [brackets] {braces} <angle> | pipe ~ tilde

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


class Request:
    def __init__(self, prompt_ids, max_tokens=256, temperature=1.0, top_p=0.95):
        self.prompt_ids = list(prompt_ids)
        self.output_ids = []
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p

    def is_finished(self, eos_id):
        return len(self.output_ids) >= self.max_tokens or (self.output_ids and self.output_ids[-1] == eos_id)


for i in range(10):
    if i % 2 == 0:
        print(f"even: {i}")
    else:
        print("odd:", i)

{"name": "get_weather", "arguments": {"location": "Shanghai", "unit": "celsius"}}
{"name": "search_web", "arguments": {"query_list": ["latest release"], "query_tag": ["technology"]}}
<think>
The user asks about the weather, so I should call the weather tool first.
</think>
<tool_calls>
{"name": "get_weather", "arguments": {"location": "Beijing"}}
</tool_calls>

#include <stdio.h>
int main(void) { for (int i = 0; i < 3; ++i) printf("%d\n", i); return 0; }
SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;
$ pip install torch tokenizers && python -m pytest -q

今天天气很好，我们去公园散步吧。人工智能正在改变世界，大型语言模型可以回答问题、写代码和翻译文本。
上海是中国最大的城市之一。你好，世界！谢谢你的帮助。
日本語の文章もあります。こんにちは、元気ですか？東京は大きな都市です。
한국어 문장도 있습니다. 안녕하세요, 만나서 반갑습니다.
Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Как дела? العربية: مرحبا بالعالم. עברית: שלום עולם.
Français : déjà vu, café crème, naïve façade. Deutsch: Grüße aus München, Straße, Äpfel und Öl.
Español: ¿Dónde está la biblioteca? ¡Qué bueno! Português: ação, coração, não.
Emoji: 😀 😃 😄 😁 😂 🤣 😊 🙂 🚀 🔥 ✨ 🎉 👍 ❤️ 🌍 🐍 🤖 👨‍👩‍👧‍👦 🇨🇳 🇺🇸 ✅ ❌ ⚡ ☕
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ π α β γ δ λ μ σ → ← ⇒ ∀ ∃ ∈ ∉ ∅ °C €100 £5 ¥300

The library opens at nine o'clock and closes at six. Children read picture books while their parents
browse the shelves of history, science, poetry and travel. Every Thursday there is a small concert in the
main hall, and on Saturdays volunteers teach programming to anyone who wants to learn.
'''


def write_tiny_tokenizer(out_dir, vocab_size: int) -> None:
    """Train a small byte-level BPE (deterministic) and write tokenizer.json + tokenizer_config.json.

    Ids: BPE vocabulary first (256 byte tokens + merges), then SPECIAL_TOKENS, like the real tokenizer;
    total size <= vocab_size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab_size

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<beginning_of_sentence>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_sentence>",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<end_of_document>",
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
