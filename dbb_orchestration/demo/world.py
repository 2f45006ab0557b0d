"""A small, realistic DBB world for the demo: a dozen people across timezones, plans and sources.

Everything is relative to :data:`DAY` (a Sunday, so the weekly Notion sync falls inside it) and fully
deterministic, so two demo runs into fresh directories produce the same emails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.testing import factories as f
from dbb_orchestration.testing.fake_notion import FakeNotion, block, rich_text

DAY = datetime(2026, 2, 8, tzinfo=UTC)  # a Sunday


class SimulatedClock:
    """The demo's wall clock: set to each simulated moment before the work of that moment runs, and read
    by the fake Resend so every ``.eml`` is dated by the simulated day, not by the real clock."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def ago(**kw: float) -> datetime:
    return DAY - timedelta(**kw)


NOTES: dict[str, list[tuple[str, str]]] = {
    "en": [
        (
            "Spaced repetition",
            "---\ntags: [learning, memory]\ncreated: 2025-11-02\n---\n# Why spacing works\n"
            "Reviewing just before you forget strengthens the memory trace. See [[Ebbinghaus curve|the forgetting curve]].\n\n"
            "- Short, frequent reviews beat cramming\n- Interleave topics\n- Test yourself, don't re-read\n\n"
            "> The best time to review is right before you would forget.\n",
        ),
        (
            "Meeting notes: Q1 planning",
            "status:: draft\n## Decisions\nWe ship the **digest redesign** in March. Details in [the brief](https://example.com/brief).\n\n"
            "1. Owners confirm scope by Friday\n2. Design review on the 14th\n",
        ),
        (
            "Stoic morning routine",
            "Ask each morning: *what is in my control today?* Write three answers.\n\n"
            "![sunrise](https://example.com/sunrise.png)\n\nThen let the rest go.",
        ),
        (
            "SQL window functions",
            "```sql\nSELECT user_id, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY created_at DESC)\nFROM note_digests;\n```\n"
            "Use them to pick the newest row per group without a self-join.",
        ),
        (
            "Book: Thinking in Systems",
            "Stocks, flows and feedback loops. [[Donella Meadows]] on leverage points: "
            "the least obvious places to intervene are often the most powerful.",
        ),
        ("Untitled", "A thought worth keeping: <b>small steps</b>, every day."),
    ],
    "es": [
        (
            "Recetas: tortilla de patatas",
            "## Ingredientes\n- 5 huevos\n- 3 patatas\n- 1 cebolla\n\nFreír a fuego lento. ¡Paciencia!",
        ),
        (
            "Frases de Machado",
            "> Caminante, no hay camino, se hace camino al andar.\n\nAntonio Machado, *Campos de Castilla*.",
        ),
        (
            "Ideas de proyecto",
            "Una app para recordar lo que lees. Conectar con [[Notion]] y enviar un correo diario.",
        ),
    ],
    "de": [
        (
            "Lernnotizen: Deutsch B2",
            "Konjunktiv II: *Wenn ich Zeit hätte, würde ich mehr lesen.*\n\n- hätte\n- wäre\n- würde",
        ),
        ("Wanderung Zugspitze", "Start 6:00 Uhr in Garmisch. Wetter prüfen: https://www.dwd.de"),
    ],
    "ja": [
        (
            "読書メモ：吾輩は猫である",
            "夏目漱石の代表作。ユーモアと風刺に満ちた語り口。\n\n- 主人公は名前のない猫\n- 明治時代の知識人を観察",
        ),
        ("毎日の習慣", "朝の散歩、日記、そして十分の読書。[[習慣化]]のコツは小さく始めること。"),
    ],
    "zh": [
        ("学习笔记：间隔重复", "在快要忘记之前复习，记忆最牢固。\n\n> 温故而知新，可以为师矣。"),
        ("旅行计划：成都", "- 大熊猫基地\n- 宽窄巷子\n- 火锅！"),
    ],
    "hi": [
        ("योग अभ्यास", "सुबह 20 मिनट: सूर्य नमस्कार, प्राणायाम और ध्यान।"),
        (
            "Recipe: masala chai",
            "Boil water with ginger and cardamom, add tea, milk and sugar. Simmer 3 minutes.",
        ),
    ],
    "fr": [
        (
            "Citations de Camus",
            "« Il faut imaginer Sisyphe heureux. »\n\naliases:: Camus\nVoir aussi [[L'Étranger]].",
        ),
        ("Cours de piano", "Gammes en do majeur, puis la *Gymnopédie n°1* de Satie, tempo lent."),
    ],
    "ar": [
        ("حكمة اليوم", "اطلبوا العلم من المهد إلى اللحد.\n\n- القراءة كل يوم\n- الكتابة كل أسبوع"),
    ],
    "pt": [
        (
            "Notas de corrida",
            "Treino intervalado: 6 × 400 m, descanso de 90 s. Próxima prova: meia maratona em abril.",
        ),
    ],
}


@dataclass
class Person:
    id: str
    name: str
    timezone: str | None  # None = no settings row (defaults apply)
    send_hour: int = 8
    interval: int = 3
    per_digest: int = 5
    pro: bool = False
    verified: bool = True
    source: str | None = None  # "obsidian" | "notion" | None
    source_name: str | None = None
    languages: tuple[str, ...] = ("en",)
    sent_digests: list[datetime] = field(default_factory=list)
    pending_seed: bool = False  # the backend made a seed digest after a first sync
    sequences: list[tuple[str, int, datetime]] = field(default_factory=list)  # (name, step, entered_at)
    notion_first_sync_today: bool = False


PEOPLE: list[Person] = [
    Person(
        "u_ada",
        "Ada Lovelace",
        "Europe/London",
        8,
        1,
        5,
        pro=True,
        source="obsidian",
        source_name="Ada's Vault",
        languages=("en",),
        sent_digests=[ago(days=1, hours=-8)],
        sequences=[("onboarding", 2, ago(days=9))],
    ),
    Person(
        "u_bruno",
        "  Bruno Díaz ",
        "America/Mexico_City",
        7,
        3,
        5,
        source="notion",
        source_name="Study Notes",
        languages=("es", "en"),
        sent_digests=[ago(days=3, hours=-13)],
        sequences=[("onboarding", 1, ago(days=3))],
    ),
    Person(
        "u_chen",
        "陈静",
        "Asia/Shanghai",
        9,
        7,
        8,
        pro=True,
        source="obsidian",
        source_name="笔记",
        languages=("zh", "en"),
        sent_digests=[ago(days=7, hours=-1)],
    ),
    Person(
        "u_devi",
        "Devi Sharma",
        "Asia/Kolkata",
        8,
        3,
        5,
        source="notion",
        source_name="Reading List",
        languages=("hi", "en"),
        sent_digests=[ago(days=d, hours=-2, minutes=-30) for d in (15, 12, 9, 6, 3)],
    ),
    Person(
        "u_emma",
        "Emma Schmidt",
        "Europe/Berlin",
        8,
        14,
        5,
        source="obsidian",
        source_name="Zettelkasten",
        languages=("de", "en"),
        sent_digests=[ago(days=d, hours=-7) for d in (30, 16, 2)],
        sequences=[("upgrade", 2, ago(days=3, hours=1))],
    ),
    Person(
        "u_farah",
        "Farah Haddad",
        "Asia/Dubai",
        20,
        3,
        3,
        source="obsidian",
        source_name=None,
        languages=("ar", "en"),
        sent_digests=[ago(days=4, hours=-16)],
    ),
    Person(
        "u_gabriel",
        "Gabriel Silva",
        "America/Sao_Paulo",
        6,
        1,
        5,
        source="notion",
        source_name="Treinos",
        languages=("pt", "en"),
        sent_digests=[ago(days=1, hours=-9)],
    ),
    Person(
        "u_hana",
        "Hana Sato",
        "Asia/Tokyo",
        7,
        2,
        10,
        pro=True,
        source="obsidian",
        source_name="Obsidian Vault",
        languages=("ja", "en"),
        sent_digests=[ago(days=2, hours=2)],
        sequences=[("upgrade", 3, ago(days=8))],
    ),
    Person("u_isla", "Isla Brown", "Australia/Sydney", 8, 3, 5, sequences=[("welcome", 1, ago(hours=2))]),
    Person("u_jonas", "Jonas", "Europe/Paris", 8, 3, 5, sequences=[("welcome", 2, ago(days=2, hours=3))]),
    Person(
        "u_kofi",
        "Kofi Mensah",
        "Africa/Accra",
        18,
        3,
        5,
        source="notion",
        source_name="Ideas",
        languages=("en",),
        notion_first_sync_today=True,
        sequences=[("welcome", 2, ago(days=2, hours=5))],
    ),
    Person(
        "u_lea",
        "Léa Martin",
        "America/New_York",
        8,
        3,
        5,
        source="obsidian",
        source_name="Carnet",
        languages=("fr", "en"),
        pending_seed=True,
        sequences=[("onboarding", 1, ago(hours=3))],
    ),
    Person(
        "u_mars",
        "Marcus Webb",
        "Mars/Olympus_Mons",
        10,
        3,
        5,
        source="obsidian",
        source_name="Vault",
        languages=("en",),
        sent_digests=[ago(days=5)],
    ),
    Person(
        "u_nadia",
        "Nadia Petrova",
        None,
        8,
        3,
        5,
        verified=False,
        source="obsidian",
        source_name="Vault",
        languages=("en",),
    ),
]


@dataclass(frozen=True)
class NotionAccount:
    user_id: str
    token: str
    database_id: str


def seed_world(conn: sa.Connection, keyring: ContentKeyring) -> list[NotionAccount]:
    """Insert every person with their settings, sources, notes, history and sequence rows."""
    accounts: list[NotionAccount] = []
    for person in PEOPLE:
        _seed_person(conn, person)
        doc_ids: list[int] = []
        if person.source == "obsidian":
            doc_ids = _seed_obsidian(conn, person, keyring)
        elif person.source == "notion":
            account, doc_ids = _seed_notion(conn, person, keyring)
            accounts.append(account)
        _seed_history(conn, person, doc_ids)
    return accounts


def _seed_person(conn: sa.Connection, person: Person) -> None:
    f.user(
        conn,
        person.id,
        name=person.name,
        email=f"{person.id[2:]}@demo.dbb.test",
        email_verified=person.verified,
        created_at=ago(days=40),
    )
    if person.timezone is not None:
        f.settings(
            conn,
            person.id,
            digest_interval_days=person.interval,
            notes_per_digest=person.per_digest,
            timezone=person.timezone,
            preferred_send_hour=person.send_hour,
        )
    if person.pro:
        f.subscription(conn, person.id, status="active")


def _seed_obsidian(conn: sa.Connection, person: Person, keyring: ContentKeyring) -> list[int]:
    """An Obsidian vault with the person's notes (and a first digest waiting, for some); the note ids."""
    connection_id = f.connection(
        conn, person.id, kind="obsidian", display_name=person.source_name, created_at=ago(days=30)
    )
    doc_ids = _insert_notes(conn, person, connection_id, keyring)
    if person.pending_seed:
        f.digest(
            conn,
            person.id,
            status="scheduled",
            scheduled_for=ago(hours=1),
            created_at=ago(hours=1),
            payload={"source": "seed_after_first_sync"},
            document_ids=doc_ids[: person.per_digest],
        )
    return doc_ids


def _seed_notion(
    conn: sa.Connection, person: Person, keyring: ContentKeyring
) -> tuple[NotionAccount, list[int]]:
    """A Notion connection with its account and database, and its notes unless its first sync is today."""
    external = f"notion-ws-{person.id}"
    token = f"secret_demo_{person.id}"
    database_id = f"db-{person.id}"
    connection_id = f.connection(
        conn,
        person.id,
        kind="notion",
        display_name=person.source_name,
        account_external_id=external,
        created_at=ago(days=20),
    )
    f.notion_account(conn, person.id, account_id=external, access_token=token)
    f.scope_item(conn, connection_id, database_id)
    doc_ids: list[int] = []
    if not person.notion_first_sync_today:
        doc_ids = _insert_notes(conn, person, connection_id, keyring, external_prefix="page-")
    return NotionAccount(person.id, token, database_id), doc_ids


def _seed_history(conn: sa.Connection, person: Person, doc_ids: list[int]) -> None:
    for number, sent_at in enumerate(sorted(person.sent_digests)):
        # A sent digest surfaced notes, like the real ones: the next few of the person's notes in turn,
        # so "digests and notes received so far" in the upgrade email add up.
        f.digest(
            conn,
            person.id,
            status="sent",
            scheduled_for=sent_at,
            sent_at=sent_at,
            created_at=sent_at,
            document_ids=history_notes(doc_ids, number, person.per_digest),
        )
    for name, step, entered_at in person.sequences:
        last = entered_at + timedelta(hours=1) if step > 1 else None
        f.sequence_state(
            conn, person.id, name, current_step=step, entered_at=entered_at, last_email_sent_at=last
        )


def history_notes(doc_ids: list[int], number: int, per_digest: int) -> list[int]:
    """The notes of a person's ``number``-th past digest: ``per_digest`` of them (at most all), taken in
    turn from where the previous digest stopped."""
    if not doc_ids:
        return []
    count = min(per_digest, len(doc_ids))
    start = number * count
    return [doc_ids[(start + i) % len(doc_ids)] for i in range(count)]


def _notes_for(person: Person) -> list[tuple[str, str]]:
    notes: list[tuple[str, str]] = []
    for lang in person.languages:
        notes.extend(NOTES[lang])
    return notes


def _insert_notes(
    conn: sa.Connection,
    person: Person,
    connection_id: int,
    keyring: ContentKeyring,
    external_prefix: str = "vault/",
) -> list[int]:
    ids = []
    for index, (title, markdown) in enumerate(_notes_for(person)):
        ids.append(
            f.document(
                conn,
                person.id,
                connection_id,
                external_id=f"{external_prefix}{index}",
                title=title,
                markdown=markdown,
                keyring=keyring,
                updated_at_source=ago(days=20 - index),
            )
        )
    return ids


def seed_notion(fake: FakeNotion, accounts: list[NotionAccount]) -> None:
    """Give each Notion user a database in the fake: pages in several languages, nested blocks, one
    page edited this morning (the weekly sync picks it up) and one in the trash."""
    people = {p.id: p for p in PEOPLE}
    for account in accounts:
        person = people[account.user_id]
        fake.add_token(account.token)
        fake.add_database(
            account.database_id,
            [f"{account.database_id}-ds"],
            title=person.source_name or "Notes",
            tokens=[account.token],
        )
        ds = f"{account.database_id}-ds"
        for index, (title, markdown) in enumerate(_notes_for(person)):
            edited = ago(hours=5) if index == 0 else ago(days=20 - index)
            fake.add_page(ds, f"page-{account.user_id}-{index}", title, edited, blocks=_blocks(markdown))
        fake.add_page(
            ds,
            f"page-{account.user_id}-trash",
            "Old draft",
            ago(hours=6),
            in_trash=True,
            blocks=[block("paragraph", "discarded")],
        )


def _blocks(markdown: str) -> list[dict]:
    """A rough markdown → Notion blocks mapping, enough for realistic pages in the fake."""
    blocks: list[dict] = []
    for line in markdown.replace("---\n", "").splitlines():
        text = line.strip()
        first_word = text.split(" ")[0]
        if not text or ":" in first_word and first_word.endswith(":") or text.startswith("```"):
            continue
        blocks.append(_block_for(text, len(blocks)))
    return blocks


# Line prefixes and the Notion block each one starts, first match wins.
_PREFIX_BLOCKS = (("## ", "heading_2"), ("# ", "heading_1"), ("> ", "quote"))


def _block_for(text: str, index: int) -> dict:
    """The block for one non-blank line; ``index`` is its position on the page."""
    for prefix, kind in _PREFIX_BLOCKS:
        if text.startswith(prefix):
            return block(kind, text[len(prefix) :])
    if text.startswith("- "):
        children = [block("paragraph", "↳ why it matters")] if index == 1 else None
        return block("bulleted_list_item", text[2:], children=children)
    if text[:2].rstrip(".").isdigit():
        return block("numbered_list_item", text.split(" ", 1)[1])
    return block("paragraph", [rich_text(text[:60], bold=index == 0), rich_text(text[60:])])
