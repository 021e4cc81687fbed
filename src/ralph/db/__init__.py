"""SQL storage: engine, tables, migrations. Only this package and the stores import SQLAlchemy."""
