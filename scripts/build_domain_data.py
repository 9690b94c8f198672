"""Build the text-to-SQL domain dataset in data/sql/: a small company database and question/SQL pairs.

Every SQL answer is executed against data/sql/company.db when the set is built, so the evaluation can
score a model by running its SQL and comparing result sets. Rebuild with:

    python scripts/build_domain_data.py --out data/sql --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

# Department -> city. Cities repeat on purpose so "by city" questions differ from "by department" ones.
DEPARTMENTS = [
    ("Sales", "London"),
    ("Engineering", "Berlin"),
    ("Marketing", "Paris"),
    ("Finance", "London"),
    ("Legal", "Madrid"),
    ("Support", "Berlin"),
    ("Research", "Paris"),
    ("Operations", "Rome"),
]
# Titles are regular nouns so a question can say "Engineers" while the SQL says 'Engineer'.
TITLES = {
    "Engineer": 72000,
    "Manager": 95000,
    "Analyst": 64000,
    "Designer": 58000,
    "Accountant": 61000,
    "Recruiter": 50000,
}
FIRST_NAMES = [
    "Alice",
    "Bruno",
    "Chloe",
    "Daniel",
    "Elena",
    "Felix",
    "Grace",
    "Hugo",
    "Irene",
    "Jonas",
    "Karin",
    "Lucas",
    "Maria",
    "Nils",
    "Olivia",
    "Pablo",
    "Rosa",
    "Simon",
    "Tara",
    "Victor",
    "Wendy",
    "Yusuf",
    "Zoe",
    "Omar",
]
LAST_NAMES = [
    "Adams",
    "Berger",
    "Costa",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ivanova",
    "Jensen",
    "Keller",
    "Lopez",
    "Martin",
    "Novak",
    "Olsen",
    "Petit",
    "Rossi",
    "Schmidt",
    "Torres",
    "Weber",
]
PROJECT_NAMES = [
    "Apollo",
    "Beacon",
    "Cobalt",
    "Delta",
    "Ember",
    "Falcon",
    "Granite",
    "Harbor",
    "Iris",
    "Juniper",
    "Kestrel",
    "Lumen",
    "Meridian",
    "Nimbus",
    "Orion",
    "Pioneer",
    "Quartz",
    "Raven",
    "Summit",
    "Tundra",
    "Unity",
    "Vertex",
    "Willow",
    "Zenith",
]
NUM_EMPLOYEES = 150
HIRE_YEARS = range(2008, 2024)
SALARY_THRESHOLDS = range(40000, 140001, 5000)
BUDGET_THRESHOLDS = range(50000, 450001, 25000)

SCHEMA = (
    "CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);\n"
    "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "department_id INTEGER NOT NULL REFERENCES departments(id), title TEXT NOT NULL, salary INTEGER NOT NULL, "
    "hire_year INTEGER NOT NULL);\n"
    "CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "department_id INTEGER NOT NULL REFERENCES departments(id), budget INTEGER NOT NULL);\n"
)

# Joins are spelled one way everywhere so the model learns a single canonical form.
EMP_DEPT = "FROM employees e JOIN departments d ON e.department_id = d.id"
PROJ_DEPT = "FROM projects p JOIN departments d ON p.department_id = d.id"


@dataclass(frozen=True)
class Template:
    """One question family: several paraphrases, one SQL pattern, and the slot those share."""

    name: str
    slot: str  # key into the slot-value table built from the database rows
    paraphrases: tuple[str, ...]
    sql: str


TEMPLATES = [
    Template(
        "emp_count_by_dept",
        "dept",
        (
            "How many employees work in the {dept} department?",
            "How many people are in {dept}?",
            "Count the employees of the {dept} department.",
            "What is the headcount of {dept}?",
            "Number of employees in {dept}?",
        ),
        f"SELECT COUNT(*) {EMP_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "emp_names_by_dept",
        "dept",
        (
            "List the names of employees in the {dept} department.",
            "Who works in {dept}?",
            "Show all employees of the {dept} department.",
            "Which employees belong to {dept}?",
            "Give me the names of the people in {dept}.",
        ),
        f"SELECT e.name {EMP_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "avg_salary_by_dept",
        "dept",
        (
            "What is the average salary in the {dept} department?",
            "What is the mean salary of {dept} employees?",
            "Average pay in {dept}?",
            "How much do {dept} employees earn on average?",
            "Compute the average salary for {dept}.",
        ),
        f"SELECT AVG(e.salary) {EMP_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "max_salary_by_dept",
        "dept",
        (
            "What is the highest salary in the {dept} department?",
            "What is the maximum salary in {dept}?",
            "Top salary paid in {dept}?",
            "How much does the best paid person in {dept} earn?",
            "Find the largest salary in {dept}.",
        ),
        f"SELECT MAX(e.salary) {EMP_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "top_earner_by_dept",
        "dept",
        (
            "Who is the highest paid employee in the {dept} department?",
            "Who earns the most in {dept}?",
            "Name the top earner of {dept}.",
            "Which {dept} employee has the largest salary?",
            "Find the best paid person in {dept}.",
        ),
        f"SELECT e.name {EMP_DEPT} WHERE d.name = '{{dept}}' ORDER BY e.salary DESC LIMIT 1;",
    ),
    Template(
        "project_names_by_dept",
        "dept",
        (
            "List the projects of the {dept} department.",
            "Which projects does {dept} run?",
            "What projects belong to {dept}?",
            "Show the project names owned by the {dept} department.",
            "Name the projects of {dept}.",
        ),
        f"SELECT p.name {PROJ_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "budget_total_by_dept",
        "dept",
        (
            "What is the total project budget of the {dept} department?",
            "How much budget do the {dept} projects have in total?",
            "Sum of project budgets for {dept}?",
            "What is the combined budget of projects in {dept}?",
            "Compute the total budget of {dept} projects.",
        ),
        f"SELECT SUM(p.budget) {PROJ_DEPT} WHERE d.name = '{{dept}}';",
    ),
    Template(
        "emp_count_by_title",
        "title",
        (
            "How many employees have the title {title}?",
            "How many {title}s are there?",
            "Count the {title}s in the company.",
            "What is the number of {title}s?",
            "How many people work as {title}?",
        ),
        "SELECT COUNT(*) FROM employees WHERE title = '{title}';",
    ),
    Template(
        "emp_names_by_title",
        "title",
        (
            "Which employees are {title}s?",
            "List all {title}s.",
            "Who works as a {title}?",
            "Show the names of employees with the title {title}.",
            "Give me every {title} in the company.",
        ),
        "SELECT name FROM employees WHERE title = '{title}';",
    ),
    Template(
        "avg_salary_by_title",
        "title",
        (
            "What is the average salary of {title}s?",
            "How much does a {title} earn on average?",
            "Mean salary for the title {title}?",
            "Average pay of employees working as {title}?",
            "Compute the average salary of all {title}s.",
        ),
        "SELECT AVG(salary) FROM employees WHERE title = '{title}';",
    ),
    Template(
        "emp_names_salary_above",
        "salary",
        (
            "List employees earning more than {salary}.",
            "Who earns more than {salary}?",
            "Which employees have a salary above {salary}?",
            "Show the names of people paid over {salary}.",
            "Find employees with a salary greater than {salary}.",
        ),
        "SELECT name FROM employees WHERE salary > {salary};",
    ),
    Template(
        "emp_count_salary_above",
        "salary",
        (
            "How many employees earn more than {salary}?",
            "Count the employees with a salary above {salary}.",
            "How many people are paid over {salary}?",
            "Number of employees whose salary exceeds {salary}?",
            "How many salaries are greater than {salary}?",
        ),
        "SELECT COUNT(*) FROM employees WHERE salary > {salary};",
    ),
    Template(
        "emp_names_hired_in",
        "year",
        (
            "Who was hired in {year}?",
            "List the employees hired in {year}.",
            "Which employees joined in {year}?",
            "Show the names of people who started in {year}.",
            "Find everyone hired during {year}.",
        ),
        "SELECT name FROM employees WHERE hire_year = {year};",
    ),
    Template(
        "emp_count_hired_after",
        "year",
        (
            "How many employees were hired after {year}?",
            "Count the employees who joined after {year}.",
            "How many people started after {year}?",
            "Number of hires later than {year}?",
            "How many employees have a hire year after {year}?",
        ),
        "SELECT COUNT(*) FROM employees WHERE hire_year > {year};",
    ),
    Template(
        "emp_names_hired_between",
        "year_range",
        (
            "Which employees were hired between {start} and {end}?",
            "List the people who joined between {start} and {end}.",
            "Who was hired from {start} to {end}?",
            "Show employees with a hire year between {start} and {end}.",
            "Find everyone who started between {start} and {end}.",
        ),
        "SELECT name FROM employees WHERE hire_year BETWEEN {start} AND {end};",
    ),
    Template(
        "dept_names_by_city",
        "city",
        (
            "Which departments are located in {city}?",
            "List the departments based in {city}.",
            "What departments are in {city}?",
            "Name the departments that sit in {city}.",
            "Show every department in the {city} office.",
        ),
        "SELECT name FROM departments WHERE city = '{city}';",
    ),
    Template(
        "emp_count_by_city",
        "city",
        (
            "How many employees work in {city}?",
            "How many people are based in {city}?",
            "Count the employees in the {city} office.",
            "What is the headcount in {city}?",
            "Number of staff working in {city}?",
        ),
        f"SELECT COUNT(*) {EMP_DEPT} WHERE d.city = '{{city}}';",
    ),
    Template(
        "project_names_budget_above",
        "budget",
        (
            "Which projects have a budget above {budget}?",
            "List projects with a budget greater than {budget}.",
            "Show the projects funded with more than {budget}.",
            "What projects cost more than {budget}?",
            "Find projects whose budget exceeds {budget}.",
        ),
        "SELECT name FROM projects WHERE budget > {budget};",
    ),
    Template(
        "emp_count_by_dept_title",
        "dept_title",
        (
            "How many {title}s work in the {dept} department?",
            "Count the {title}s in {dept}.",
            "How many employees in {dept} have the title {title}?",
            "Number of {title}s in the {dept} department?",
            "How many people in {dept} work as {title}?",
        ),
        f"SELECT COUNT(*) {EMP_DEPT} WHERE d.name = '{{dept}}' AND e.title = '{{title}}';",
    ),
    Template(
        "salary_of_emp",
        "employee",
        (
            "What is the salary of {employee}?",
            "How much does {employee} earn?",
            "Show the salary of the employee named {employee}.",
            "What is {employee} paid?",
            "Find the salary for {employee}.",
        ),
        "SELECT salary FROM employees WHERE name = '{employee}';",
    ),
    Template(
        "dept_of_emp",
        "employee",
        (
            "Which department does {employee} work in?",
            "What department is {employee} in?",
            "In which department is {employee}?",
            "Name the department of {employee}.",
            "Find the department where {employee} works.",
        ),
        f"SELECT d.name {EMP_DEPT} WHERE e.name = '{{employee}}';",
    ),
]


def make_rows(rng: random.Random) -> dict[str, list[tuple]]:
    """Draw the synthetic company: departments, employees and projects, all from the seeded rng."""
    departments = [(i + 1, name, city) for i, (name, city) in enumerate(DEPARTMENTS)]
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], NUM_EMPLOYEES)
    employees = []
    for i, name in enumerate(names):
        title = rng.choice(sorted(TITLES))
        # Round salaries so thresholds such as "more than 60000" split them cleanly.
        salary = round(TITLES[title] * rng.uniform(0.75, 1.35), -3)
        employees.append((i + 1, name, rng.randint(1, len(DEPARTMENTS)), title, int(salary), rng.choice(HIRE_YEARS)))
    # Three projects per department so every department has a non-empty project list.
    projects = [(i + 1, name, i // 3 + 1, rng.randrange(20000, 500001, 5000)) for i, name in enumerate(PROJECT_NAMES)]
    return {"departments": departments, "employees": employees, "projects": projects}


def sql_literal(value) -> str:
    """Render one Python value as a SQL literal (the synthetic strings contain no quotes)."""
    return str(value) if isinstance(value, int) else f"'{value}'"


def to_sql_script(rows: dict[str, list[tuple]]) -> str:
    """The CREATE + INSERT script that company.db is built from."""
    lines = [SCHEMA.strip()]
    for table, table_rows in rows.items():
        for row in table_rows:
            lines.append(f"INSERT INTO {table} VALUES ({', '.join(sql_literal(v) for v in row)});")
    return "\n".join(lines) + "\n"


def build_database(script: str, path: Path) -> sqlite3.Connection:
    """Create the sqlite file from the script, replacing any old one, and return a connection to it."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.commit()
    return conn


def slot_values(rows: dict[str, list[tuple]]) -> dict[str, list[dict]]:
    """Candidate slot fillings for each slot kind; combinations that return nothing are dropped later."""
    depts = sorted(name for name, _ in DEPARTMENTS)
    years = list(HIRE_YEARS)
    return {
        "dept": [{"dept": d} for d in depts],
        "title": [{"title": t} for t in sorted(TITLES)],
        "salary": [{"salary": s} for s in SALARY_THRESHOLDS],
        "year": [{"year": y} for y in years],
        "year_range": [{"start": a, "end": b} for a, b in itertools.combinations(years, 2) if b - a <= 4],
        "city": [{"city": c} for c in sorted({city for _, city in DEPARTMENTS})],
        "budget": [{"budget": b} for b in BUDGET_THRESHOLDS],
        "dept_title": [{"dept": d, "title": t} for d in depts for t in sorted(TITLES)],
        "employee": [{"employee": row[1]} for row in sorted(rows["employees"], key=lambda r: r[1])],
    }


def is_informative(result: list[tuple]) -> bool:
    """True when a query answers something: rows exist and they are not just a NULL or a zero count."""
    return bool(result) and any(value not in (None, 0) for row in result for value in row)


def valid_combos(template: Template, candidates: list[dict], conn: sqlite3.Connection) -> list[dict]:
    """Keep the slot fillings whose SQL runs and returns an informative result."""
    return [combo for combo in candidates if is_informative(conn.execute(template.sql.format(**combo)).fetchall())]


def make_row(template: Template, combo: dict, paraphrase: int) -> dict:
    """One dataset line in chat `messages` form, with the question and SQL repeated as plain fields."""
    question = template.paraphrases[paraphrase].format(**combo)
    sql = template.sql.format(**combo)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": sql}],
        "question": question,
        "sql": sql,
        "template": template.name,
        "paraphrase": paraphrase,
        "slots": combo,
    }


def split_template(template: Template, combos: list[dict], rng: random.Random, args) -> tuple[list, list]:
    """Hold out a share of this template's slot fillings for eval; train sees only the others.

    Every paraphrase of a held-out filling goes to the eval pool, so eval questions test new
    (template, value) combinations rather than new wordings of seen ones.
    """
    combos = combos[:]
    rng.shuffle(combos)
    n_eval = max(1, round(args.eval_fraction * len(combos)))
    train_pairs = [(c, p) for c in combos[n_eval:] for p in range(len(template.paraphrases))]
    eval_pairs = [(c, p) for c in combos[:n_eval] for p in range(len(template.paraphrases))]
    # Caps keep the many-valued templates (employee names, year ranges) from swamping the rest.
    train_pairs = rng.sample(train_pairs, min(args.max_train_per_template, len(train_pairs)))
    eval_pairs = rng.sample(eval_pairs, min(args.max_eval_per_template, len(eval_pairs)))
    return [make_row(template, c, p) for c, p in train_pairs], [make_row(template, c, p) for c, p in eval_pairs]


def check_split(train: list[dict], eval_rows: list[dict]) -> None:
    """Fail loudly if an eval question or SQL string leaks into train."""
    train_questions = {r["question"] for r in train}
    train_sql = {r["sql"] for r in train}
    leaked = [r for r in eval_rows if r["question"] in train_questions or r["sql"] in train_sql]
    if leaked:
        raise AssertionError(f"{len(leaked)} eval rows overlap train, e.g. {leaked[0]['question']!r}")


def count_new_values(train: list[dict], eval_rows: list[dict]) -> int:
    """Eval rows with a slot value that no train row uses (the model must copy it from the question)."""
    seen = {str(value) for row in train for value in row["slots"].values()}
    return sum(any(str(value) not in seen for value in row["slots"].values()) for row in eval_rows)


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line, keys in a fixed order so the file hash is reproducible."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def readme_text(args, counts: dict, hashes: dict, per_template: dict) -> str:
    """The dataset card: task, schema, recipe, split policy, counts and hashes."""
    table = "\n".join(f"| `{name}` | {n_train} | {n_eval} |" for name, (n_train, n_eval) in per_template.items())
    hash_lines = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in hashes.items())
    return f"""# sql: text-to-SQL over a small company database

Questions in English about a synthetic company; the answer is one SQLite query. A prediction is scored
by **execution**: run it on `company.db` and compare its result set with the reference's (as sorted lists
of tuples). Every reference query was executed when the set was built and returns a non-empty,
informative result (not just NULL or a zero count).

## Schema (`company.sql`, built into `company.db`)

```sql
{SCHEMA.strip()}
```

{len(DEPARTMENTS)} departments, {NUM_EMPLOYEES} employees, {len(PROJECT_NAMES)} projects; names, titles, salaries,
hire years and budgets are synthetic, drawn from a seeded random generator.

## Format

`train.jsonl` and `eval.jsonl`, one JSON object per line:

```json
{{"messages": [{{"role": "user", "content": "<question>"}}, {{"role": "assistant", "content": "<sql>"}}],
 "question": "<question>", "sql": "<sql>", "template": "<template name>", "paraphrase": 0, "slots": {{...}}}}
```

The reference answer is the assistant message. There is no system prompt, to keep sequences short
(with the shipped base model's tokenizer and chat template a row is about 70 tokens, at most about 105).

## How it was made

```bash
python scripts/build_domain_data.py --out {args.out} --seed {args.seed}
```

{len(TEMPLATES)} question templates, each with {len(TEMPLATES[0].paraphrases)} paraphrases and one canonical SQL pattern
(upper-case keywords, single spaces, one join spelling, trailing `;`). Slots are filled with departments,
cities, titles, salary and budget thresholds, hire years and employee names.

## Split policy

For each template, the valid slot fillings are shuffled (seed {args.seed}) and {args.eval_fraction:.0%} of them
(at least one) are held out: all their paraphrases form the eval pool, the rest form the train pool.
So every eval row is a (template, slot value) combination never seen in training. Every wording, department,
city and title also appears in training (in other combinations); {counts["eval_with_new_value"]} \
eval rows hold a number or an
employee name that no training row uses, which the model has to copy from the question. \
Pools are capped at {args.max_train_per_template} train
and {args.max_eval_per_template} eval rows per template. \
The build checks that no eval question or SQL string occurs in train.

| template | train | eval |
|---|---|---|
{table}
| **total** | **{counts["train"]}** | **{counts["eval"]}** |

## Files and SHA-256

| file | sha256 |
|---|---|
{hash_lines}

`company.db` is rebuilt from `company.sql` with Python's `sqlite3`; its bytes can differ between SQLite
versions, the SQL script is the source of truth.

## Licence

Generated by the sovtune project; released under the same licence as the repository (Apache-2.0).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sql"), help="output directory (default: data/sql)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic rows and the split (default: 0)")
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="share of slot fillings held out per template")
    parser.add_argument("--max-train-per-template", type=int, default=120, help="cap on train rows per template")
    parser.add_argument("--max-eval-per-template", type=int, default=10, help="cap on eval rows per template")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build database, generate and split the pairs, write files and the dataset card."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rows = make_rows(rng)
    script = to_sql_script(rows)
    (args.out / "company.sql").write_text(script, encoding="utf-8")
    conn = build_database(script, args.out / "company.db")
    candidates = slot_values(rows)
    train, eval_rows, per_template = [], [], {}
    for template in TEMPLATES:
        template_train, template_eval = split_template(
            template, valid_combos(template, candidates[template.slot], conn), rng, args
        )
        train += template_train
        eval_rows += template_eval
        per_template[template.name] = (len(template_train), len(template_eval))
    conn.close()
    check_split(train, eval_rows)
    rng.shuffle(train)
    rng.shuffle(eval_rows)  # so any prefix of eval.jsonl is a mix of templates
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(eval_rows, args.out / "eval.jsonl")
    files = ["company.sql", "company.db", "train.jsonl", "eval.jsonl"]
    hashes = {name: sha256_file(args.out / name) for name in files}
    counts = {"train": len(train), "eval": len(eval_rows), "eval_with_new_value": count_new_values(train, eval_rows)}
    (args.out / "README.md").write_text(readme_text(args, counts, hashes, per_template), encoding="utf-8")
    print(json.dumps({"counts": counts, "sha256": hashes}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
