"""The organism's conversation format: a LLaVA-style system prompt and a chat template over the world's words."""

SYSTEM_PROMPT = (
    "a chat between a curious user and an artificial intelligence assistant . "
    "the assistant gives helpful , detailed , and polite answers to the questions of the user ."
)

# Jinja chat template in the shape LlavaProcessor.apply_chat_template expects. Message content may be a string or a
# list of {"type": "image"} / {"type": "text", "text": ...} parts. The assistant turn ends with </s>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}" + SYSTEM_PROMPT + " {% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s> {% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def user_turn(prompt: str, image: bool = True) -> list[dict]:
    """A one-turn conversation asking ``prompt`` about an image, in the processor's message format."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]
