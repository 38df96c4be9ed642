"""FEALLM's web UI on a current Gradio: chat about an image, and per-face analysis of a photo.

    python -m feallm_llava.ui --controller http://127.0.0.1:21001            # upstream's controller
    python -m feallm_llava.ui --base-url http://127.0.0.1:8000/v1 --model feallm [--api-key KEY]

Runs in its own environment (`bash launch/bootstrap.sh --env ui` -> .venv-ui: gradio, no
torch); `launch/serve.sh` starts it next to upstream's controller and worker.

- **Chat**: upload an image, ask; the answer streams in. Through the controller the
  prompt is upstream's llava_v1 form with `<image>` (the worker renders it again in the
  checkpoint's trained template); through an OpenAI-compatible server the image goes as
  a data URL.
- **Analyze**: upload a photo; faces found with the detector of `feallm analyze`, each
  crop asked the FER, AU and reasoning questions, answers read with FEALLM's parser:
  the photo with boxes, per face the expression, the AUs with their FACS names and the
  reasoning, and the rows as CSV (`serve.rows.COLUMNS`). A file that is not a usable
  image (corrupt, empty, a decompression bomb) gives the loader's reason, not a crash; an
  upload over --max-upload-mb, or of a file without an image type, Gradio's own message.

Safety defaults: binds 127.0.0.1 (another --host prints `EXPOSURE_WARNING`); uploads over
--max-upload-mb are refused; --concurrency requests run at once, --queue-size wait.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_PORT = 7860
EXPOSURE_WARNING = (
    "WARNING: the FEALLM web UI listens on {host}, reachable from other machines. It has no "
    "login: anyone who reaches the port can use the model behind it and upload files to this "
    "machine. Expose it only on a network you trust, or keep the default 127.0.0.1 and use an "
    "SSH tunnel (ssh -L {port}:127.0.0.1:{port} host)."
)
CHAT_PLACEHOLDER = "Upload a face (or a photo) and ask about it"
ANALYZE_HELP = (
    "Upload a photo. Faces are found with YuNet and aligned on their eyes, nose and mouth "
    "corners like the model's training crops (as `feallm analyze` does), each face is asked "
    "three questions (expression, action units, reasoning), and the answers are read with "
    "FEALLM's parser. The CSV holds one row per face.")


# ----------------------------------------------------------------------------- work

class UI:
    """What the page's events call: chat turns and photo analyses through one backend."""

    def __init__(self, backend, *, max_new_tokens: int = 512):
        self.backend = backend
        self.max_new_tokens = max_new_tokens  # the chat's default; the Analyze tab's is the backend's
        self.out_dir = Path(tempfile.mkdtemp(prefix="feallm-ui-"))
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)

    def models(self) -> tuple[list[str], str]:
        """(model names, a note when there are none or the backend cannot be reached)."""
        from feallm_llava.ui.backends import BackendError

        try:
            names = self.backend.models()
        except BackendError as err:
            return [], f"{err}"
        return names, "" if names else f"no model registered yet at {self.backend.describe()}"

    def chat(self, message, history, model, temperature, max_new_tokens):
        """Yield the answer so far (or one error line opening with `chat.ERROR_MARK`)."""
        from feallm_llava.data.images import ImageError, load_rgb
        from feallm_llava.ui.backends import BackendError
        from feallm_llava.ui.chat import ERROR_MARK, conversation

        if isinstance(message, str):
            message = {"text": message, "files": []}
        files = [f.get("path") if isinstance(f, dict) else f for f in message.get("files") or []]
        turns, image_path = conversation(history or [], message.get("text") or "", [f for f in files if f])
        if not turns[-1].question and image_path is None:
            yield f"{ERROR_MARK} Type a question (and upload an image to ask about)."
            return
        if not model:
            yield f"{ERROR_MARK} No model to ask: {self.models()[1] or 'choose one above'}."
            return
        image = None
        if image_path is not None:
            try:  # the loader's checks, as in the Analyze tab: corrupt, empty, decompression bombs
                image = load_rgb(image_path, name=Path(image_path).name)
            except ImageError as err:
                yield f"{ERROR_MARK} Cannot use this image: {err.reason}"
                return
            except OSError as err:
                yield f"{ERROR_MARK} Cannot read this image: {err}"
                return
        try:
            for partial in self.backend.stream(model, turns, image, max_new_tokens=int(max_new_tokens),
                                               temperature=float(temperature)):
                yield partial
        except BackendError as err:
            yield f"{ERROR_MARK} {err}"

    def analyze(self, path, model):
        """(annotated image, summary markdown, AU table, CSV path, aligned face crops) for the
        upload at `path`; the table as {"headers", "data"}, the crops as (image, caption)."""
        from feallm_llava.ui.faces import AU_TABLE_HEADERS, analyze_file

        empty = {"headers": list(AU_TABLE_HEADERS), "data": []}
        if not path:
            return None, "Upload a photo first.", empty, None, []
        if not model:
            return None, f"**No model to ask:** {self.models()[1] or 'choose one above'}.", empty, None, []
        report = analyze_file(path, self.backend.for_model(model), label=Path(path).name,
                              out_dir=tempfile.mkdtemp(dir=self.out_dir))
        table = {"headers": report.au_headers, "data": report.au_table}
        return report.image, report.message, table, str(report.csv) if report.csv else None, report.crops


# ----------------------------------------------------------------------------- page

def build(ui: UI, *, title: str = "FEALLM"):
    """The Gradio Blocks of the page (gradio imported here, after the environment is set)."""
    import gradio as gr

    from feallm_llava.ui.faces import AU_TABLE_HEADERS

    names, note = ui.models()

    def refresh(current):
        models, why = ui.models()
        value = current if current in models else models[0] if models else None
        return gr.Dropdown(choices=models, value=value, info=why or None)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# {title}\nFacial expression, action units and their reasoning. "
                    f"Backend: {ui.backend.describe()}.")
        with gr.Row():
            model = gr.Dropdown(choices=names, value=names[0] if names else None, label="Model",
                                info=note or None, interactive=True, elem_id="model", scale=4)
            reload = gr.Button("Refresh models", elem_id="refresh_models", scale=1)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab_chat"):
                temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature", render=False)
                max_tokens = gr.Slider(16, 2048, value=ui.max_new_tokens, step=16, label="Max new tokens",
                                       render=False)
                gr.ChatInterface(
                    ui.chat, multimodal=True,
                    chatbot=gr.Chatbot(elem_id="chatbot", height=420, label="Chat"),
                    textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single",
                                                 placeholder=CHAT_PLACEHOLDER, elem_id="chat_input"),
                    additional_inputs=[model, temperature, max_tokens],
                    additional_inputs_accordion=gr.Accordion("Generation", open=False, render=False),
                    api_name="chat", fill_height=False, save_history=False)
            with gr.Tab("Analyze", id="analyze", elem_id="tab_analyze"):
                gr.Markdown(ANALYZE_HELP)
                with gr.Row():
                    with gr.Column(scale=2):
                        photo = gr.File(label="Photo", file_types=["image"], type="filepath", elem_id="photo",
                                        height=120)
                        run = gr.Button("Analyze", variant="primary", elem_id="analyze_button")
                        report = gr.Markdown(elem_id="face_report")
                        rows_csv = gr.File(label="Rows (CSV)", interactive=False, elem_id="rows_csv", height=80)
                    with gr.Column(scale=3):
                        annotated = gr.Image(label="Faces", type="pil", format="png", interactive=False,
                                             elem_id="annotated", height=360)
                        crops = gr.Gallery(label="Aligned faces (what the model saw)", columns=6, height=150,
                                           object_fit="contain", interactive=False, elem_id="face_crops")
                        aus = gr.Dataframe(headers=list(AU_TABLE_HEADERS), label="Action units per face",
                                           interactive=False, elem_id="au_table", wrap=True)
                outputs = [annotated, report, aus, rows_csv, crops]
                photo.upload(ui.analyze, [photo, model], outputs, api_name="analyze")
                run.click(ui.analyze, [photo, model], outputs, api_name=False)
        reload.click(refresh, model, model, api_name=False)
        page.load(refresh, model, model, api_name=False)
    return page


def theme():
    """Gradio's default look with local fonts: the page fetches nothing from the network."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


# ----------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    from feallm_llava.serve.stack import LOCALHOST

    p = argparse.ArgumentParser(
        prog="python -m feallm_llava.ui", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="examples:\n  python -m feallm_llava.ui --controller http://127.0.0.1:21001\n"
               "  python -m feallm_llava.ui --base-url http://127.0.0.1:8000/v1 --model feallm")
    backend = p.add_argument_group("backend (exactly one)")
    backend.add_argument("--controller", metavar="URL", help="upstream LLaVA controller (launch/serve.sh starts one)")
    backend.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    backend.add_argument("--model", help="model name on the --base-url server")
    backend.add_argument("--api-key", default=None, help="key for --base-url (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--host", default=os.environ.get("FEALLM_UI_HOST", LOCALHOST),
                   help="address to bind ($FEALLM_UI_HOST); anything but loopback prints a warning")
    p.add_argument("--port", type=int, default=int(os.environ.get("FEALLM_UI_PORT", DEFAULT_PORT)),
                   help="port ($FEALLM_UI_PORT)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted")
    p.add_argument("--concurrency", type=int, default=2, help="requests the page runs at once")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more are refused")
    p.add_argument("--max-new-tokens", type=int, default=512, help="chat answer length limit (adjustable in the page)")
    p.add_argument("--analysis-max-new-tokens", type=int, default=256, help="answer length limit of the Analyze tab")
    p.add_argument("--title", default="FEALLM", help="page title")
    p.add_argument("--users-file", default=os.environ.get("FEALLM_UI_USERS_FILE"),
                   help="log people in from this file of NAME:scrypt$... lines (python -m "
                        "feallm_llava.integration.access add-user FILE NAME); default $FEALLM_UI_USERS_FILE, "
                        "else no login")
    return p


def make_backend(args: argparse.Namespace):
    from feallm_llava.ui.backends import ControllerBackend, OpenAIChatBackend

    common = {"max_new_tokens": args.analysis_max_new_tokens, "concurrency": args.concurrency}
    if args.controller:
        return ControllerBackend(args.controller, **common)
    return OpenAIChatBackend(args.base_url, args.model, api_key=args.api_key, **common)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if bool(args.controller) == bool(args.base_url):
        p.error("give exactly one backend: --controller URL (upstream LLaVA) or --base-url URL --model NAME")
    if args.base_url and not args.model:
        p.error("--base-url needs --model NAME (the model's name on that server)")
    for flag in ("concurrency", "queue_size", "max_new_tokens", "analysis_max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_upload_mb <= 0:
        p.error("--max-upload-mb must be > 0")
    from feallm_llava.serve.stack import is_exposed

    from feallm_llava.integration.access import AccessError, UserCheck

    try:
        login = UserCheck(args.users_file) if args.users_file else None
    except AccessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if is_exposed(args.host) and login is None:
        print(EXPOSURE_WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        print("error: gradio is not installed in this Python; the UI runs in its own environment: "
              "bash launch/bootstrap.sh --env ui, then .venv-ui/bin/python -m feallm_llava.ui ...", file=sys.stderr)
        return 2
    if int(gradio.__version__.split(".")[0]) < 6:
        print(f"error: gradio {gradio.__version__} is too old for this UI (needs the version in "
              f"launch/requirements-ui.txt): bash launch/bootstrap.sh --env ui", file=sys.stderr)
        return 2
    ui = UI(make_backend(args), max_new_tokens=args.max_new_tokens)
    page = build(ui, title=args.title)
    page.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    print(f"FEALLM UI on http://{args.host}:{args.port} ({ui.backend.describe()})", flush=True)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb",
                share=False, ssr_mode=False, mcp_server=False, show_error=False, quiet=True,
                run_history=False,  # no record of a user's uploads and answers (nor its cloud option)
                auth=login, auth_message="FEALLM: log in with your name and password" if login else None,
                footer_links=["api", "gradio", "settings"], theme=theme(), inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
