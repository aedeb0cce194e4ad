-- Passages looked up by their document: counting each document's passages (the document list, one document)
-- and deleting or replacing a document's passages (also the cascade from course_documents). Without it each
-- of these scanned every passage of every tenant (measured at 52,000 passages: listing a course of 500
-- documents took 22.5 s without, 46 ms with).
CREATE INDEX document_passages_document ON document_passages (document_id);

-- Every question searches the passages; documents are written rarely. New entries of a GIN index wait in a
-- pending list that every search reads through until it is merged (at 4 MB by default, or by autovacuum):
-- after an upload of a few thousand passages that was 9-16 ms of a 17 ms search. At 256 kB a search reads
-- at most 32 pages of it; the upload that fills it pays the merge (the largest document: about 0.3 s more).
ALTER INDEX document_passages_search SET (gin_pending_list_limit = 256);
SELECT gin_clean_pending_list('document_passages_search');
