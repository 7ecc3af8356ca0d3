"""The web demo's page (Gradio Blocks) over a `demo_state.Demo`, and its server.

The guidance controls are drawn from the model family's `GuidanceControls`: one slider,
radio or checkbox group per `Control`, named after it in the page and the API.
"""
import inspect

from absl import logging

from sample.demo_inputs import DEFAULT_PROMPT
from sample.demo_inputs import DEFAULT_WORD
from sample.demo_inputs import one_line
from sample.demo_inputs import pick_word
from sample.demo_inputs import RequestError
from sample.demo_inputs import word_choices
from sample.demo_state import Demo

# The request's own fields, before the family's controls (the API's parameter order).
REQUEST_FIELDS = ('subject', 'prompt', 'word', 'seed', 'num_images', 'num_steps')


def _title(demo: Demo) -> str:
  config, family = demo.pipe.config, demo.family
  weights = config.get('pretrained', '') or 'tiny random models: images are noise-like'
  adapter = config.get('adapter', '') or family.no_adapter
  return (f'# RealCustom\n{family.title} · weights: {weights} · adapter: {adapter}\n\n'
          'Upload a subject, type a prompt and pick its **target word** (the real word the '
          'subject narrows, e.g. "toy"): the influence scope of that word gates the '
          'subject. The strip shows the scope (grey) above the x0 prediction at a few '
          'steps; the plain text-to-image images start from the same noise.')


def _slider(gr, minimum, maximum, **kwargs):
  """A slider, or the one value it could take as a fixed number (Gradio 6 refuses a
  slider whose minimum is its maximum, e.g. a page limited to one image)."""
  if minimum >= maximum:
    kwargs.pop('step', None)
    return gr.Number(minimum=minimum, maximum=maximum, interactive=False,
                     precision=0 if float(minimum).is_integer() else None, **kwargs)
  return gr.Slider(minimum, maximum, **kwargs)


def _component(gr, control, value, max_steps: int):
  """The Gradio input of one `family.Control`."""
  elem_id = control.elem_id or control.name
  if control.kind == 'slider':
    maximum = max_steps if control.maximum is None else control.maximum
    return _slider(gr, control.minimum, maximum, value=value, step=control.step,
                   label=control.label, elem_id=elem_id)
  if control.kind == 'choice':
    return gr.Radio(list(control.choices), value=value, label=control.label, elem_id=elem_id)
  if control.kind == 'choices':
    return gr.CheckboxGroup(list(control.choices), value=value, label=control.label,
                            elem_id=elem_id)
  raise ValueError(f'unknown control kind {control.kind!r} of {control.name}')


def _api_function(run, names: list[str]):
  """`run(*request fields, {control: value})` as a generator whose signature names every
  field and control (Gradio names the API's parameters after it)."""
  def generate(*args):
    fields = args[:len(REQUEST_FIELDS)]
    values = dict(zip(names, args[len(REQUEST_FIELDS):]))
    yield from run(*fields, values)
  generate.__signature__ = inspect.Signature(
      [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
       for n in REQUEST_FIELDS + tuple(names)])
  return generate


def build_ui(demo: Demo):
  """The Gradio Blocks page over `demo` (not launched).

  Args:
    demo: a (warmed) Demo.

  Returns:
    The gr.Blocks; its queue runs one generation at a time.
  """
  import gradio as gr  # pylint: disable=g-import-not-at-top
  names = demo.controls.names
  with gr.Blocks(title='RealCustom demo', analytics_enabled=False) as blocks:
    gr.Markdown(_title(demo))
    with gr.Row():
      inputs = _input_column(gr, demo)
      outputs = _output_column(gr, demo)
    subject, prompt, word, seed, num_images, num_steps = (
        inputs[k] for k in REQUEST_FIELDS)
    controls, static_controls, note = (inputs['controls'], inputs['static_controls'],
                                       inputs['note'])
    generate_button = inputs['generate']
    images, plain, strip, status = (outputs[k] for k in ('images', 'plain', 'strip',
                                                          'status'))

    def run(subject_, prompt_, word_, seed_, num_images_, num_steps_, values):
      """The generation, as a generator: a 'compiling' status first where it will."""
      try:
        request = demo.check_request(subject_, prompt_, word_, seed_, num_images_,
                                     num_steps_, values)
      except RequestError as e:
        raise gr.Error(str(e), print_exception=False) from None
      key = demo.static_key(request.num_steps, request.batch, request.settings)
      if key not in demo.compiled:
        yield (gr.skip(), gr.skip(), gr.skip(),
               f'compiling for {demo.describe(key)} (first use) ...')
      try:
        result = demo.generate(request)
      except ValueError as e:  # what the pipeline refuses, named
        raise gr.Error(one_line(e), print_exception=False) from None
      except Exception as e:  # pylint: disable=broad-except
        # Logged with its traceback; the page gets one line and the worker lives on.
        logging.exception('generation failed')
        raise gr.Error(f'generation failed ({type(e).__name__}: {one_line(e)}); see the '
                       'server log', print_exception=False) from None
      caption = lambda i: f'seed {request.seed}, image {i + 1}'
      yield ([(x, caption(i)) for i, x in enumerate(result.images)],
             [(x, caption(i)) for i, x in enumerate(result.plain)], result.strip,
             demo.status(result))

    def update_words(prompt_, word_):
      options = word_choices(prompt_)
      return gr.Dropdown(choices=options, value=pick_word(prompt_, word_, options))

    def update_note(num_images_, num_steps_, *values):
      try:
        key = demo.ui_key(num_steps_, num_images_, dict(zip(names, values)))
      except (RequestError, ValueError, TypeError):
        key = None
      return demo.compile_note(key)

    # preprocess=False: the upload reaches `load_upload` as Gradio stored it (its path
    # checked to be an upload), so an unreadable or huge file is our one-line message
    # rather than a processing error raised inside Gradio.
    event = generate_button.click(
        _api_function(run, names), [subject, prompt, word, seed, num_images, num_steps]
        + controls, [images, plain, strip, status], api_name='generate', preprocess=False,
        concurrency_limit=1, concurrency_id='generate')
    event.then(update_note, [num_images, num_steps] + controls, note,
               api_visibility='private', queue=False)
    prompt.change(update_words, [prompt, word], word, api_visibility='private', queue=False,
                  show_progress='hidden')
    for control in static_controls:
      control.change(update_note, [num_images, num_steps] + controls, note,
                     api_visibility='private', queue=False, show_progress='hidden')
  blocks.queue(default_concurrency_limit=1)
  return blocks


def _input_column(gr, demo: Demo) -> dict:
  """The left column: subject, prompt, word, seed, counts, the family's controls, the
  compile note and the button (by name; 'controls' in the family's order)."""
  defaults = demo.defaults()
  choices = word_choices(DEFAULT_PROMPT)
  with gr.Column(scale=1):
    out = dict(
        subject=gr.Image(label='Subject image', type='filepath', image_mode=None,
                         sources=['upload', 'clipboard'], elem_id='subject', height=240),
        prompt=gr.Textbox(label='Prompt', value=DEFAULT_PROMPT, elem_id='prompt'),
        word=gr.Dropdown(label='Target word', choices=choices,
                         value=pick_word(DEFAULT_PROMPT, DEFAULT_WORD, choices),
                         allow_custom_value=True, elem_id='word',
                         info='a word of the prompt; type a phrase ("teddy bear") if '
                              'it is not listed'))
    with gr.Row():
      out['seed'] = gr.Number(label='Seed', value=0, precision=0, minimum=0,
                              maximum=2**32 - 1, elem_id='seed')
      out['num_images'] = _slider(gr, 1, demo.max_images, value=1, step=1,
                                  label='Number of images', elem_id='num_images')
      out['num_steps'] = _slider(gr, 1, demo.max_steps, value=demo.default_steps, step=1,
                                 label='Steps', elem_id='num_steps')
    out['controls'] = [_component(gr, c, defaults[c.name], demo.max_steps)
                       for c in demo.controls.controls]
    out['static_controls'] = [out['num_images'], out['num_steps']] + [
        x for c, x in zip(demo.controls.controls, out['controls']) if c.static]
    out['note'] = gr.Markdown(demo.compile_note(demo.ui_key(demo.default_steps, 1,
                                                            defaults)),
                              elem_id='compile_note')
    out['generate'] = gr.Button('Generate', variant='primary', elem_id='generate')
  return out


def _output_column(gr, demo: Demo) -> dict:
  """The right column: RealCustom and plain T2I galleries, the scope strip, the status."""
  with gr.Column(scale=2):
    with gr.Row():
      images = gr.Gallery(label='RealCustom', format='png', columns=2, height=300,
                          elem_id='images')
      plain = gr.Gallery(label='Plain text-to-image (same seed)', format='png',
                         columns=2, height=300, elem_id='plain')
    strip = gr.Image(label='Influence scope over the steps (scope above x0)', type='pil',
                     format='png', elem_id='strip')
    status = gr.Textbox(label='Status', interactive=False, lines=2, elem_id='status',
                        value=f'ready (start-up compile: {demo.compile_seconds:.1f} s)'
                        if demo.compile_seconds is not None else 'ready')
  return dict(images=images, plain=plain, strip=strip, status=status)


def _theme():
  """Gradio's default look with the system's fonts: its own fetch Google Fonts, which a
  closed network refuses (and a page then waits for)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top
  return gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                           font_mono=['ui-monospace', 'Consolas', 'monospace'])


def launch(blocks, host: str = '127.0.0.1', port: int = 7860,
           max_file_size_mb: float = 20.0) -> str:
  """Starts serving `blocks` in the background (never a share tunnel); returns its URL."""
  blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                quiet=True, show_error=False, max_file_size=int(max_file_size_mb * 2**20),
                ssr_mode=False, mcp_server=False, pwa=False, theme=_theme())
  return f'http://{host}:{port}/'
