"""The layering rule: only generation implementations (and perception, lazily) need torch/transformers."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TORCH = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    for name in ("torch", "torchaudio", "transformers"):
        sys.modules[name] = None  # `import torch` now raises ImportError
    import chatbot.config, chatbot.state
    from chatbot.conversation.service import ChatService
    from chatbot.conversation.store import ConversationStore
    from chatbot.generation.base import GenerationSettings
    from chatbot.perception.encoder import MultimodalEncoder
    from chatbot.web.page import ChatPage
    from tests.support.canned import CannedGenerator

    store = ConversationStore(Path(tempfile.mkdtemp()))
    service = ChatService(MultimodalEncoder(store.media_dir), CannedGenerator(), store,
                          GenerationSettings(max_new_tokens=8))
    conv = service.new_conversation()
    print(list(service.respond("key:a", conv, "hello there"))[-1])
    ChatPage(service, "s" * 32).build()
""")


def test_service_store_config_and_page_work_without_torch_or_transformers():
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "thanks for your message about hello there"  # a whole turn ran, canned


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_app_and_benchmarks_import_nothing_from_tests():
    for folder, forbidden in [("chatbot", ("tests", "bench", "harness")), ("bench", ("tests",))]:
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in imported_modules(path) if m.split(".")[0] in forbidden}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
