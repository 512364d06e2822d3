"""Step templates: checks on save, the sandbox, escaping, custom fields, HTML to text, the cache."""

import subprocess
import sys
from pathlib import Path

import pytest

from campaigns import templating
from campaigns.errors import InvalidInput
from campaigns.templating import RenderError, html_to_text, preview, render_step, validate_step_templates

ROOT = Path(__file__).resolve().parent.parent

CONTACT = {
    "email": "ada@example.com",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "timezone": "Europe/London",
    "fields": {"company": "Analytical Engines", "plan": {"name": "pro"}, "k": "__class__"},
}
CAMPAIGN = {"id": 7, "name": "Launch", "from_email": "team@example.com", "from_name": "Team"}


def render(html, subject="Hi", text=None, contact=CONTACT):
    return render_step({"subject": subject, "html": html, "text": text}, contact, CAMPAIGN, "https://h.test/u/tok")


def problems(exc_info):
    return exc_info.value.details


# --------------------------------------------------------------------------- checks on save


def test_syntax_error_names_field_and_line():
    with pytest.raises(InvalidInput) as err:
        validate_step_templates("Hello", "<p>one</p>\n<p>two</p>\n{% if contact.first_name %}", None, "steps[1]")
    assert err.value.status == 422
    assert list(problems(err)) == ["steps[1].html"]
    assert problems(err)["steps[1].html"][0].startswith("line 3: ")
    assert "steps[1].html" in err.value.message and "line 3" in err.value.message


def test_unknown_variable_is_refused_with_its_line():
    with pytest.raises(InvalidInput) as err:
        validate_step_templates(
            "Hi {{ contact.first_name }}", "<p>a</p>\n\n<p>{{ coupon_code }}</p>", "{{ x }}", "steps[0]"
        )
    details = problems(err)
    assert details["steps[0].html"] == [
        "line 3: unknown variable 'coupon_code' (templates can use contact, campaign and unsubscribe_url)"
    ]
    assert details["steps[0].text"][0].startswith("line 1: unknown variable 'x'")
    assert "steps[0].subject" not in details


@pytest.mark.parametrize("source,line,name", [
    ("{% set c = contact %}{{ c.phone }}", 1, "contact.phone"),
    ("<p>\n{% for c in [contact] %}\n{{ c.phone }}{% endfor %}", 3, "contact.phone"),
    ("{{ [contact][0].phone }}", 1, "contact.phone"),
    ("{{ contact|attr('phone') }}", 1, "contact.phone"),
    ("{% set k = campaign %}{{ k['budget'] }}", 1, "campaign.budget"),
])
def test_an_unknown_attribute_reached_through_an_alias_is_refused_on_save(source, line, name):
    # They used to pass the check and then fail every send of the step.
    with pytest.raises(InvalidInput) as err:
        validate_step_templates("Hi", source, None)
    assert problems(err)["html"][0].startswith(f"line {line}: unknown variable '{name}'")
    with pytest.raises(RenderError, match="unknown variable"):
        render(source)


def test_aliases_of_known_names_and_data_dependent_templates_pass():
    for source in ("{% set c = contact %}{{ c.first_name }}", "{{ contact|attr('email') }}",
                   "{{ contact.fields.score + 1 }}", "{{ (contact.fields.n|int) * 2 }}",
                   "{{ contact }} {{ campaign }}"):
        validate_step_templates("Hi", source, None)  # nothing raised: the sample contact lacks score


@pytest.mark.parametrize(
    "source,needle",
    [
        ("{{ contact.phone }}", "contact.phone"),
        ("{{ contact['phone'] }}", "contact.phone"),
        ("{{ campaign.workspace_id }}", "campaign.workspace_id"),
        ("{{ unknown.thing }}", "'unknown'"),
        ("{{ range(10) | list }}", "'range'"),
        ("{{ contact.first_name | nosuchfilter }}", "unknown filter 'nosuchfilter'"),
        ("{% if contact.email is nosuchtest %}{% endif %}", "unknown test 'nosuchtest'"),
        ("{% include 'other.html' %}", "include"),
    ],
)
def test_names_outside_the_context_are_refused(source, needle):
    with pytest.raises(InvalidInput) as err:
        validate_step_templates("s", "<p>ok</p>\n" + source, None, "steps[2]")
    (message,) = problems(err)["steps[2].html"][:1]
    assert message.startswith("line 2: ") and needle in message


def test_allowed_names_pass():
    validate_step_templates(
        "Hi {{ contact.first_name | default('there') }} from {{ campaign.name }}",
        """<p>{{ contact.email }} {{ contact.last_name }} {{ contact.timezone }} {{ contact.fields.anything }}
        {{ contact.fields['with space'] }} {{ campaign.from_email }} {{ campaign.from_name }}</p>
        {% for key in contact.fields %}{{ loop.index }}: {{ key }}{% endfor %}
        {% set greeting = 'Hello' %}{{ greeting }} <a href="{{ unsubscribe_url }}">unsubscribe</a>""",
        "{{ contact.first_name | upper }}",
        "steps[0]",
    )


INJECTIONS = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ contact.fields.__class__ }}",
    "{{ contact['__class__'] }}",
    "{{ contact.fields | attr('__class__') }}",
    "{{ contact.fields | map(attribute='__class__') | list }}",
    "{{ request.application.__globals__ }}",
    "{{ config.items() }}",
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("field", ["subject", "html", "text"])
def test_injection_payloads_are_refused_on_save(payload, field):
    parts = {"subject": "s", "html": "<p>x</p>", "text": None, field: payload}
    with pytest.raises(InvalidInput) as err:
        validate_step_templates(parts["subject"], parts["html"], parts["text"], "steps[0]")
    assert f"steps[0].{field}" in problems(err)


@pytest.mark.parametrize(
    "payload",
    [
        "{{ '{0.__class__}'.format(contact) }}",  # str.format goes through the sandbox's formatter
        "{{ contact.fields | attr(contact.fields.k) }}",  # the attribute name only known at render
        "{{ 'a' * 100000000 }}",
        "{{ 9 ** (9 ** 9) }}",
        "{{ contact.first_name.nope }}",
    ],
)
def test_what_gets_past_the_checks_is_inert_at_render(payload):
    try:
        validate_step_templates("s", payload, None, "steps[0]")
    except InvalidInput:
        return  # refused on save: fine too
    with pytest.raises(RenderError) as err:
        render(payload)
    assert err.value.field == "html"
    assert err.value.status == 422


def test_dynamic_key_lookups_cannot_reach_python_internals():
    # contact.fields[...] only ever looks in the contact's own fields.
    out = render("[{{ contact.fields[contact.fields.k] }}]")
    assert out.html == "[]"


# --------------------------------------------------------------------------- rendering


def test_html_is_autoescaped_subject_and_text_are_not():
    contact = dict(CONTACT, first_name="<script>alert(1)</script>", fields={"note": "Tom & Jerry"})
    out = render(
        "<p>Hi {{ contact.first_name }} {{ contact.fields.note }}</p>",
        subject="Hi {{ contact.first_name }}",
        text="Hi {{ contact.first_name }} {{ contact.fields.note }}",
        contact=contact,
    )
    assert "<script>" not in out.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out.html and "Tom &amp; Jerry" in out.html
    assert out.subject == "Hi <script>alert(1)</script>"
    assert out.text == "Hi <script>alert(1)</script> Tom & Jerry"


def test_missing_custom_fields_and_none_render_empty():
    contact = {"email": "x@example.com", "first_name": None, "fields": {"plan": {"name": "pro"}}}
    out = render(
        "[{{ contact.first_name }}][{{ contact.fields.company }}][{{ contact.fields.company.name }}]"
        "[{{ contact.fields['no such'] }}][{{ contact.fields.plan.name }}][{{ contact.fields.plan.tier }}]"
        "[{{ contact.fields.company | default('your company') }}]"
        "{% if contact.fields.company %}yes{% else %}no{% endif %}",
        contact=contact,
    )
    assert out.html == "[][][][][pro][][your company]no"


def test_an_empty_name_is_missing_for_filters_and_defaults_too():
    # A contact imported without a name: "Hi NONE" and "Hi " were what these printed.
    contact = {"email": "x@example.com", "first_name": None, "last_name": "", "fields": {"score": "7"}}
    out = render(
        "Hi {{ contact.first_name|default('there') }}|{{ contact.first_name|upper }}|{{ contact.last_name ~ '!' }}|"
        "{{ contact.last_name|default('-') }}|{% if contact.first_name %}named{% else %}unnamed{% endif %}|"
        "{{ contact.fields.missing|int }}|{{ contact.fields.missing|float(1.5) }}|{{ contact.fields.score|int + 1 }}|"
        "{{ campaign.from_name|default('Herald') }}",
        contact=contact,
    )
    assert out.html == "Hi there||!|-|unnamed|0|1.5|8|Team"
    named = render("Hi {{ contact.first_name|default('there')|upper }}")
    assert named.html == "Hi ADA"


def test_context_values():
    out = render(
        "{{ contact.email }}|{{ contact.last_name }}|{{ contact.timezone }}|{{ campaign.name }}|"
        "{{ campaign.from_name }}|{{ campaign.id }}|{{ unsubscribe_url }}",
    )
    assert out.html == "ada@example.com|Lovelace|Europe/London|Launch|Team|7|https://h.test/u/tok"


def test_subject_is_one_line():
    contact = dict(CONTACT, first_name="Ada\r\nBcc: evil@example.com")
    out = render("<p>x</p>", subject="Hi {{ contact.first_name }}", contact=contact)
    assert out.subject == "Hi Ada Bcc: evil@example.com"


def test_explicit_text_template_wins_over_derived_text():
    out = render("<p>HTML version</p>", text="Plain {{ contact.first_name }}\n")
    assert out.text == "Plain Ada\n"


def test_text_is_derived_from_html():
    out = render(
        """<html><head><title>Ignored</title><style>p { color: red }</style></head><body>
        <h1>Hello   {{ contact.first_name }} &amp; friends</h1>
        <p>First   paragraph,<br>second   line.</p>
        <script>document.write("nope")</script>
        <p>Read <a href="https://example.com/post?a=1&amp;b=2">the post</a>,
           or <a href="https://example.com">https://example.com</a>.</p>
        <ul><li>one</li><li>two</li></ul>
        <p>Caf&eacute; &#8212; &lt;tag&gt;&nbsp;end</p>
        <p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
        </body></html>"""
    )
    assert out.text == (
        "Hello Ada & friends\n\n"
        "First paragraph,\nsecond line.\n\n"
        "Read the post (https://example.com/post?a=1&b=2), or https://example.com.\n\n"
        "- one\n- two\n\n"
        "Café — <tag> end\n\n"
        "Unsubscribe (https://h.test/u/tok)"
    )


def test_html_to_text_details():
    assert html_to_text("") == ""
    assert html_to_text("plain words") == "plain words"
    assert html_to_text("<div>a</div><div>b</div>") == "a\nb"
    assert html_to_text("<pre>  keep\n    indent</pre>") == "  keep\n    indent"
    assert html_to_text('<img src="x.png" alt="Logo"><p>x</p>') == "Logo\n\nx"
    assert html_to_text('<a href="mailto:a@b.example">a@b.example</a>') == "a@b.example"
    assert html_to_text('<a href="#top">top</a>') == "top"
    assert html_to_text("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>") == "a b\nc"


def test_compiled_once_rendered_many():
    templating.clear_template_cache()
    step = {"subject": "Hi {{ contact.first_name }} #cache-test", "html": "<p>{{ contact.email }} #cache-test</p>"}
    for i in range(200):
        out = render_step(step, {"email": f"c{i}@example.com", "first_name": f"C{i}"}, CAMPAIGN, "u")
        assert out.html == f"<p>c{i}@example.com #cache-test</p>"
    info = templating.template_cache_info()
    assert info.misses == 2  # subject and html, each compiled once
    assert info.hits == 2 * 200 - 2
    # the same source as html and as subject/text compiles separately (escaping differs)
    render_step({"subject": step["html"], "html": step["html"]}, CONTACT, CAMPAIGN, "u")
    assert templating.template_cache_info().misses == 3


def test_validation_warms_the_cache():
    templating.clear_template_cache()
    validate_step_templates("S {{ campaign.name }}", "<p>{{ contact.email }}</p>", None)
    render(subject="S {{ campaign.name }}", html="<p>{{ contact.email }}</p>")
    assert templating.template_cache_info().misses == 2


def test_preview_returns_errors_instead_of_raising():
    bad = preview({"subject": "Hi", "html": "<p>\n{{ contact.phone }}</p>", "text": "{% for %}"})
    assert bad["html"] is None and bad["subject"] is None
    assert bad["errors"]["html"][0].startswith("line 2: unknown variable 'contact.phone'")
    assert bad["errors"]["text"][0].startswith("line 1: ")
    broken_at_render = preview({"subject": "Hi", "html": "{{ 1 / 0 }}"})
    assert broken_at_render["errors"] == {"html": ["ZeroDivisionError: division by zero"]}
    good = preview({"subject": "Hi {{ contact.first_name }}", "html": "<p>{{ contact.email }}</p>"})
    assert good["errors"] == {}
    assert good["subject"] == "Hi Jane" and good["text"] == "jane.doe@example.com"


def test_rows_and_dicts_both_work():
    class Row:
        email, first_name, last_name, timezone, fields = "r@example.com", "Row", None, None, None

    out = render_step({"subject": "{{ contact.first_name }}", "html": "{{ contact.fields.x }}!"}, Row(), None, "u")
    assert out == templating.RenderedEmail("Row", "!", "!")


def test_importable_without_flask():
    code = (
        "import sys; import campaigns.templating, campaigns.campaign_rules; "
        "assert 'flask' not in sys.modules, 'flask was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("source", [
    "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "{% if 1 %}" * 3000 + "{% endif %}" * 3000,
    "{% if 1 %}" * 150 + "{% endif %}" * 150,  # parses, but Python refuses the generated code
])
def test_pathological_nesting_is_refused_not_a_crash(source):
    with pytest.raises(InvalidInput) as err:
        validate_step_templates("s", source, None, "steps[0]")
    assert problems(err)["steps[0].html"][0].startswith("line 1: ")
    assert preview({"subject": "s", "html": source})["errors"]["html"]
    with pytest.raises(RenderError):
        render(source)
