"""Token counts as the benchmarks spell them: 64K, 1M, 4M (K = 2^10, M = 2^20, G = 2^30)."""


def parse_tokens(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)
